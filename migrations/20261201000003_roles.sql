-- Two roles. The role that runs these migrations owns the schema; the
-- service connects as a login role that is a member of `handid_app`, which
-- may read and write the service's own tables but may only INSERT into the
-- audit log: it can neither read nor rewrite history (no UPDATE, DELETE or
-- TRUNCATE, and, not being the owner, no DISABLE TRIGGER either), nor change
-- the schema.
--
-- `handid_app` is cluster-wide and created here when absent (the migrating
-- role then needs CREATEROLE; a DBA may create it beforehand instead:
-- `CREATE ROLE handid_app NOLOGIN`). The service's login role is the
-- operator's: `CREATE ROLE handid_server LOGIN PASSWORD '...' IN ROLE handid_app`.
-- A migration that adds a table grants what the service needs on it.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'handid_app') THEN
        CREATE ROLE handid_app NOLOGIN;
    END IF;
EXCEPTION
    -- Created meanwhile by the migration of another database of the cluster.
    WHEN duplicate_object OR unique_violation THEN NULL;
END
$$;

GRANT USAGE ON SCHEMA public TO handid_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON galleries, subjects, enrollments, templates TO handid_app;
GRANT SELECT, INSERT, UPDATE ON models TO handid_app;
-- Written by the change triggers, which run with the writer's rights.
GRANT SELECT, INSERT ON changes TO handid_app;
GRANT INSERT ON audit_log TO handid_app;
-- `serve` checks, without migrating, that the schema is the one it needs.
GRANT SELECT ON _sqlx_migrations TO handid_app;
