-- `files_by_state` changed on every state change of every file (two B-tree writes per
-- change) to serve only `status`, whose counts scan the whole table anyway and whose
-- per-state listings read at most every row once. Claiming keeps its partial index.
DROP INDEX files_by_state;
