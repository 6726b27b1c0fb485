-- The service may append to the audit log, but not choose a row's time or
-- its number: `at` (the commit's `now()`) and `id` (the sequence) are the
-- database's. With INSERT on the whole table a compromised service could
-- back-date a row, or give one a time inside a window an investigator
-- trusts; the grant now names the columns it writes (server/src/store/
-- audit.rs), and an INSERT naming `at` or `id` is refused (42501).
REVOKE INSERT ON audit_log FROM handid_app;
GRANT INSERT (actor, action, gallery_id, subject_id, model_id, outcome, top_score, peer, detail)
    ON audit_log TO handid_app;
