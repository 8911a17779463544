//! The control socket: how a command reaches the running `serve` of its root.
//!
//! `serve` listens on `<root>/control.sock`, a Unix socket of mode 0600, and answers only
//! peers of its own user (or root), checked by the kernel's peer credentials. One request
//! per connection: one JSON line, answered by one JSON line, then the socket is closed.
//!
//! ```text
//! -> {"prune":{"repo":"laptop","dry_run":false}}      ("repo": null: every repository)
//! <- {"reports":[{"repo":"laptop","report":{"versions_removed":12,...}}]}
//! <- {"reports":[{"repo":"laptop","error":"..."}]}       (that repository's prune failed)
//! <- {"error":"no repository nope under /srv/coffer"}    (the request as a whole)
//! ```
//!
//! `coffer-receiver prune` uses it while `serve` holds the root's lock: the serving process
//! prunes in turn with its sessions (see `docs/design.md`, "Prune while serving") and the
//! command prints the reports it gets back exactly as a prune of its own would.

use std::future::Future;
use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::layout::Layout;

/// The socket's file name under the root.
pub const SOCKET: &str = "control.sock";
/// Longest request line accepted.
pub const MAX_REQUEST: usize = 64 << 10;
/// Longest reply line read (a report per repository).
pub const MAX_REPLY: usize = 64 << 20;
/// How long a peer has to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the command waits to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A request to the serving process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Prune `repo` (every repository when `None`), or only plan it with `dry_run`.
    Prune { repo: Option<String>, dry_run: bool },
}

/// Its answer: what became of each repository, or why the request was refused as a whole.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply<R> {
    Reports(Vec<Outcome<R>>),
    Error(String),
}

/// One repository's prune: its report, or its error.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome<R> {
    pub repo: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report: Option<R>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl<R> Outcome<R> {
    /// The outcome as a result.
    pub fn into_result(self) -> (String, Result<R, String>) {
        let r = match (self.report, self.error) {
            (Some(r), None) => Ok(r),
            (_, Some(e)) => Err(e),
            (None, None) => Err("the serving receiver sent neither a report nor an error".into()),
        };
        (self.repo, r)
    }
}

/// Errors of the control socket, on either side.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket path {0} is too long for a Unix socket (at most 107 bytes)")]
    PathTooLong(PathBuf),
    #[error("cannot listen on the control socket {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "serve is running but its control socket {path} does not answer ({source}); \
         is it a serve of an older release? stop it to prune, or try again"
    )]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the serving receiver over {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the serving receiver closed {path} without an answer (it stopped meanwhile?); \
         nothing is known of the request's outcome: run it again"
    )]
    NoReply { path: PathBuf },
    #[error("the serving receiver's answer over {path} is malformed: {msg}")]
    Malformed { path: PathBuf, msg: String },
    #[error("the serving receiver: {0}")]
    Remote(String),
}

/// Where `serve` of `layout`'s root listens.
pub fn socket_path(layout: &Layout) -> PathBuf {
    layout.root().join(SOCKET)
}

fn check_len(path: &Path) -> Result<(), ControlError> {
    if path.as_os_str().len() > 107 {
        return Err(ControlError::PathTooLong(path.to_path_buf()));
    }
    Ok(())
}

/// Makes the control socket (the caller holds the serve lock, so a socket file left there
/// is a dead `serve`'s and is replaced), mode 0600.
pub fn bind(layout: &Layout) -> Result<UnixListener, ControlError> {
    let path = socket_path(layout);
    check_len(&path)?;
    let bind_err = |source| ControlError::Bind {
        path: path.clone(),
        source,
    };
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(bind_err(e)),
    }
    let l = UnixListener::bind(&path).map_err(bind_err)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    Ok(l)
}

/// True when the peer on `s` runs as this process's user or as root.
fn peer_allowed(s: &UnixStream) -> bool {
    let me = nix::unistd::geteuid().as_raw();
    match s.peer_cred() {
        Ok(c) => c.uid() == me || c.uid() == 0,
        Err(_) => false,
    }
}

/// Answers requests on `listener` until `cancel`, each connection on its own task, with
/// `handle`'s reply. The socket file is removed when it stops.
pub async fn serve<R, F, Fut>(
    listener: UnixListener,
    path: PathBuf,
    cancel: CancellationToken,
    handle: F,
) where
    R: Serialize + Send + 'static,
    F: Fn(Request) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Reply<R>> + Send + 'static,
{
    let handle = Arc::new(handle);
    loop {
        let stream = tokio::select! {
            _ = cancel.cancelled() => break,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!("control socket: accepting: {e}");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                        _ = cancel.cancelled() => break,
                    }
                }
            },
        };
        if !peer_allowed(&stream) {
            tracing::warn!("control socket: refused a peer of another user");
            continue;
        }
        let handle = handle.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, &*handle, cancel).await {
                tracing::warn!("control socket: {e}");
            }
        });
    }
    let _ = std::fs::remove_file(&path);
}

/// Reads one request from `stream`, answers it.
async fn answer<R, F, Fut>(
    stream: UnixStream,
    handle: &F,
    cancel: CancellationToken,
) -> Result<(), String>
where
    R: Serialize,
    F: Fn(Request) -> Fut,
    Fut: Future<Output = Reply<R>>,
{
    let (rd, mut wr) = stream.into_split();
    let mut line = Vec::new();
    let mut rd = tokio::io::BufReader::new(rd).take(MAX_REQUEST as u64 + 1);
    let read = tokio::time::timeout(REQUEST_TIMEOUT, rd.read_until(b'\n', &mut line)).await;
    let reply: Reply<R> = match read {
        Err(_) => return Err("a peer sent no request in time".into()),
        Ok(Err(e)) => return Err(format!("reading a request: {e}")),
        Ok(Ok(_)) if line.len() > MAX_REQUEST => {
            Reply::Error(format!("request longer than {MAX_REQUEST} bytes"))
        }
        Ok(Ok(_)) => match serde_json::from_slice::<Request>(&line) {
            Ok(req) => {
                tracing::info!(?req, "control socket: request");
                tokio::select! {
                    r = handle(req) => r,
                    _ = cancel.cancelled() => Reply::Error(
                        "serve is shutting down; the request was not completed".into()),
                }
            }
            Err(e) => Reply::Error(format!("malformed request: {e}")),
        },
    };
    let mut out = serde_json::to_vec(&reply).map_err(|e| format!("encoding a reply: {e}"))?;
    out.push(b'\n');
    wr.write_all(&out)
        .await
        .map_err(|e| format!("sending a reply: {e}"))?;
    wr.shutdown().await.map_err(|e| format!("closing: {e}"))
}

/// Sends `req` to the `serve` of `layout`'s root and waits for its answer (as long as the
/// request takes: a prune may take minutes). An error reply is [`ControlError::Remote`].
pub fn request<R: DeserializeOwned>(
    layout: &Layout,
    req: &Request,
) -> Result<Vec<Outcome<R>>, ControlError> {
    let path = socket_path(layout);
    check_len(&path)?;
    let io = |source| ControlError::Io {
        path: path.clone(),
        source,
    };
    let s =
        std::os::unix::net::UnixStream::connect(&path).map_err(|source| ControlError::Connect {
            path: path.clone(),
            source,
        })?;
    s.set_write_timeout(Some(CONNECT_TIMEOUT)).map_err(io)?;
    let mut line = serde_json::to_vec(req).map_err(|e| ControlError::Malformed {
        path: path.clone(),
        msg: e.to_string(),
    })?;
    line.push(b'\n');
    (&s).write_all(&line).map_err(io)?;
    let mut reply = Vec::new();
    BufReader::new(std::io::Read::take(&s, MAX_REPLY as u64))
        .read_until(b'\n', &mut reply)
        .map_err(io)?;
    if reply.is_empty() {
        return Err(ControlError::NoReply { path });
    }
    match serde_json::from_slice::<Reply<R>>(&reply) {
        Ok(Reply::Reports(r)) => Ok(r),
        Ok(Reply::Error(e)) => Err(ControlError::Remote(e)),
        Err(e) => Err(ControlError::Malformed {
            path,
            msg: e.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Fake {
        repo: String,
        n: u64,
    }

    #[test]
    fn a_request_is_answered_and_errors_and_garbage_are_told_apart() {
        let d = tempfile::tempdir().expect("tempdir");
        let layout = Layout::new(d.path());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let cancel = CancellationToken::new();
        let listener = rt.block_on(async { bind(&layout) }).expect("bind");
        let mode = std::fs::metadata(socket_path(&layout))
            .expect("socket")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let task = rt.spawn(serve(
            listener,
            socket_path(&layout),
            cancel.clone(),
            |req: Request| async move {
                match req {
                    Request::Prune {
                        repo: Some(r),
                        dry_run,
                    } if r != "nope" => Reply::Reports(vec![
                        Outcome {
                            repo: r.clone(),
                            report: Some(Fake {
                                repo: r,
                                n: dry_run as u64,
                            }),
                            error: None,
                        },
                        Outcome {
                            repo: "broken".into(),
                            report: None,
                            error: Some("disk on fire".into()),
                        },
                    ]),
                    Request::Prune { repo, .. } => {
                        Reply::Error(format!("repository {repo:?} does not exist"))
                    }
                }
            },
        ));
        let got: Vec<(String, Result<Fake, String>)> = request(
            &layout,
            &Request::Prune {
                repo: Some("laptop".into()),
                dry_run: true,
            },
        )
        .expect("answered")
        .into_iter()
        .map(Outcome::into_result)
        .collect();
        assert_eq!(
            got,
            vec![
                (
                    "laptop".to_string(),
                    Ok(Fake {
                        repo: "laptop".into(),
                        n: 1
                    })
                ),
                ("broken".to_string(), Err("disk on fire".to_string())),
            ]
        );
        let e = request::<Fake>(
            &layout,
            &Request::Prune {
                repo: Some("nope".into()),
                dry_run: false,
            },
        )
        .expect_err("refused");
        assert!(e.to_string().contains("does not exist"), "{e}");
        // A malformed request gets an error line, not a hang.
        let mut s = std::os::unix::net::UnixStream::connect(socket_path(&layout)).expect("c");
        s.write_all(b"{\"delete_everything\":{}}\n").expect("send");
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).expect("reply");
        assert!(line.contains("malformed request"), "{line}");
        // Stopped: the socket is gone and a request is a clear error.
        cancel.cancel();
        rt.block_on(task).expect("stopped");
        assert!(!socket_path(&layout).exists());
        let e = request::<Fake>(
            &layout,
            &Request::Prune {
                repo: None,
                dry_run: false,
            },
        )
        .expect_err("nobody listens");
        assert!(matches!(e, ControlError::Connect { .. }), "{e}");
    }

    #[test]
    fn the_request_format_is_stable() {
        let r = Request::Prune {
            repo: None,
            dry_run: true,
        };
        assert_eq!(
            serde_json::to_string(&r).expect("json"),
            r#"{"prune":{"repo":null,"dry_run":true}}"#
        );
        let e: Reply<Fake> = Reply::Error("x".into());
        assert_eq!(serde_json::to_string(&e).expect("json"), r#"{"error":"x"}"#);
    }
}
