-- coffer-receiver index, schema 3: every version also lives in a pack, as a commit record.
--
-- `deleted`: whether the version records the file's deletion, as the agent said (protocol 5
-- on): 1 or 0; NULL for versions committed before the flag existed (the receiver cannot
-- read it from the sealed manifest).
-- `record_pack`, `record_offset`: where the version's commit record is. NULL until it has
-- been written: versions committed before commit records existed are written out once,
-- oldest first, when the repository is first opened by a receiver that knows this schema
-- (the upgrade); `versions_unrecorded` finds what is left of that work cheaply.
ALTER TABLE versions ADD COLUMN deleted INTEGER;
ALTER TABLE versions ADD COLUMN record_pack INTEGER;
ALTER TABLE versions ADD COLUMN record_offset INTEGER;
CREATE INDEX versions_unrecorded ON versions (version) WHERE record_pack IS NULL;
