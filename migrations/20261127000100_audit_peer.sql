-- Audit "who", second part: `actor` holds the API key id or the client
-- certificate subject established by access control; the peer address of
-- the call is kept beside it as extra evidence. Nullable: rows written
-- before this migration, and calls whose transport gave no address, have
-- none. The append-only triggers of audit_log (initial migration) cover the
-- new column as well; adding it rewrites no row.
ALTER TABLE audit_log ADD COLUMN peer TEXT CHECK (peer IS NULL OR length(peer) <= 128);
