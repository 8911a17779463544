//! Who gets in, and how many at once: connections per address before they are authorized
//! ([`PerAddress`]), and session slots per agent key and per repository ([`Caps`]). The
//! server decides what to do with a connection turned away; this module only counts.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Semaphore;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves only counts behind: go on with them.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The address a connection is counted under: an IPv4 address (also when it arrives
/// mapped into IPv6), or an IPv6 address's /64 network, which one host may own whole.
pub fn counted_address(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// Connections not yet authorized, per address (see [`counted_address`]).
#[derive(Default)]
pub struct PerAddress {
    counts: Mutex<HashMap<IpAddr, usize>>,
}

impl PerAddress {
    /// Counts a connection from `ip`, unless its address already has `cap`.
    pub fn enter(self: &Arc<Self>, ip: IpAddr, cap: usize) -> Option<AddressSlot> {
        let addr = counted_address(ip);
        let mut counts = lock(&self.counts);
        let n = counts.entry(addr).or_insert(0);
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(AddressSlot {
            owner: self.clone(),
            addr,
        })
    }

    /// Connections counted now for `ip`'s address.
    #[cfg(test)]
    fn count(&self, ip: IpAddr) -> usize {
        lock(&self.counts)
            .get(&counted_address(ip))
            .copied()
            .unwrap_or(0)
    }
}

/// One connection counted for its address, until dropped.
pub struct AddressSlot {
    owner: Arc<PerAddress>,
    addr: IpAddr,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut counts = lock(&self.owner.counts);
        if let Some(n) = counts.get_mut(&self.addr) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.addr);
            }
        }
    }
}

/// At most `cap` sessions for each `K` (an agent key, a repository): a semaphore each,
/// kept while someone holds or waits for one of its permits.
pub struct Caps<K> {
    cap: usize,
    sems: Mutex<HashMap<K, Arc<Semaphore>>>,
}

impl<K: Hash + Eq + Clone> Caps<K> {
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            sems: Mutex::new(HashMap::new()),
        }
    }

    /// The cap.
    pub fn cap(&self) -> usize {
        self.cap
    }

    /// `k`'s semaphore. Semaphores no one holds or waits for any longer (only the map has
    /// them) are forgotten when a new one is made, so the map holds only those in use.
    pub fn semaphore(&self, k: &K) -> Arc<Semaphore> {
        let mut sems = lock(&self.sems);
        if let Some(s) = sems.get(k) {
            return s.clone();
        }
        sems.retain(|_, s| Arc::strong_count(s) > 1);
        let s = Arc::new(Semaphore::new(self.cap));
        sems.insert(k.clone(), s.clone());
        s
    }

    /// Entries in the map now.
    #[cfg(test)]
    fn len(&self) -> usize {
        lock(&self.sems).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_gets_its_cap_and_its_slots_back() {
        let p = Arc::new(PerAddress::default());
        let a: IpAddr = "192.0.2.1".parse().expect("ip");
        let b: IpAddr = "192.0.2.2".parse().expect("ip");
        let held: Vec<AddressSlot> = (0..3).filter_map(|_| p.enter(a, 3)).collect();
        assert_eq!(held.len(), 3);
        assert!(p.enter(a, 3).is_none(), "over the cap");
        let other = p.enter(b, 3).expect("another address is not affected");
        drop(held);
        assert_eq!(p.count(a), 0);
        assert!(p.enter(a, 3).is_some());
        drop(other);
        assert!(
            lock(&p.counts).is_empty(),
            "nothing kept for idle addresses"
        );
    }

    #[test]
    fn ipv6_counts_by_network_and_mapped_ipv4_as_ipv4() {
        let p = Arc::new(PerAddress::default());
        let x: IpAddr = "2001:db8:1:2::1".parse().expect("ip");
        let y: IpAddr = "2001:db8:1:2:ffff::9".parse().expect("ip");
        let _s = p.enter(x, 1).expect("first");
        assert!(p.enter(y, 1).is_none(), "the same /64");
        assert!(p.enter("2001:db8:1:3::1".parse().expect("ip"), 1).is_some());
        let v4: IpAddr = "192.0.2.7".parse().expect("ip");
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().expect("ip");
        let _t = p.enter(v4, 1).expect("v4");
        assert!(p.enter(mapped, 1).is_none(), "the same address");
    }

    #[test]
    fn caps_share_one_semaphore_per_key_and_forget_idle_ones() {
        let c: Caps<u32> = Caps::new(2);
        let s = c.semaphore(&1);
        let p1 = s.clone().try_acquire_owned().expect("1");
        let _p2 = c.semaphore(&1).try_acquire_owned().expect("2");
        assert!(
            c.semaphore(&1).try_acquire_owned().is_err(),
            "key 1 is full"
        );
        assert!(c.semaphore(&2).try_acquire_owned().is_ok(), "key 2 is not");
        drop((s, p1));
        assert!(
            c.semaphore(&1).try_acquire_owned().is_ok(),
            "a permit came back"
        );
        // Key 2 is idle: forgotten when another key's semaphore is made.
        let _ = c.semaphore(&3);
        assert_eq!(c.len(), 2, "keys 1 (held) and 3");
    }
}
