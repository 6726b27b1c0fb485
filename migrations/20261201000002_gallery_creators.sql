-- Galleries remember who created them, so each caller (API key id or
-- client certificate grant) may create only so many
-- (`limits.max_galleries_per_caller`): memory grows with templates, not with
-- the names a caller can invent. Galleries created before this migration
-- have no creator and count against no one.
ALTER TABLE galleries ADD COLUMN created_by TEXT CHECK (created_by IS NULL OR length(created_by) <= 256);
CREATE INDEX galleries_created_by ON galleries (created_by) WHERE created_by IS NOT NULL;
