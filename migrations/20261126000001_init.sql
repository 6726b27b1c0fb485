-- handid initial schema.
--
-- Threat model (CLIP-FH dissertation): the database holds embedding vectors
-- and metadata, NEVER an image. No table has a column able to hold image
-- bytes (no bytea anywhere; a test checks the catalogue).

-- Models the service has loaded. Templates name the model that produced them;
-- templates of different embedding spaces are never compared.
CREATE TABLE models (
    model_id        TEXT PRIMARY KEY,              -- hash of the weights
    embedding_space TEXT NOT NULL,
    architecture    TEXT NOT NULL,
    embedding_dim   INTEGER NOT NULL CHECK (embedding_dim > 0),
    manifest        JSONB NOT NULL DEFAULT '{}'::jsonb,
    first_loaded_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- A named population (a site, a door, a customer).
CREATE TABLE galleries (
    gallery_id TEXT PRIMARY KEY CHECK (gallery_id ~ '^[A-Za-z0-9._:-]{1,128}$'),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE subjects (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    gallery_id TEXT NOT NULL REFERENCES galleries (gallery_id) ON DELETE CASCADE,
    subject_id TEXT NOT NULL CHECK (subject_id ~ '^[A-Za-z0-9._:-]{1,128}$'),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT subjects_gallery_subject_key UNIQUE (gallery_id, subject_id)
);

-- One Enroll call made with an idempotency key; a retry finds it here and
-- returns the first result. Inserted in the same transaction as its
-- templates, so a key exists exactly when its templates do.
CREATE TABLE enrollments (
    idempotency_key TEXT PRIMARY KEY CHECK (length(idempotency_key) BETWEEN 1 AND 256),
    subject         BIGINT NOT NULL REFERENCES subjects (id) ON DELETE CASCADE,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- An enrolled embedding. `seq` orders templates by enrolment (ties in
-- Identify are broken by it) and lets a replica catch up on what it missed.
CREATE TABLE templates (
    template_id     UUID PRIMARY KEY,
    seq             BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
    subject         BIGINT NOT NULL REFERENCES subjects (id) ON DELETE CASCADE,
    gallery_id      TEXT NOT NULL REFERENCES galleries (gallery_id) ON DELETE CASCADE,
    model_id        TEXT NOT NULL REFERENCES models (model_id),
    dimension       INTEGER NOT NULL CHECK (dimension > 0),
    embedding       REAL[] NOT NULL,
    quality         REAL NOT NULL DEFAULT 1.0 CHECK (quality >= 0 AND quality <= 1),
    idempotency_key TEXT REFERENCES enrollments (idempotency_key) ON DELETE CASCADE,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT templates_embedding_dimension CHECK (
        array_ndims(embedding) = 1 AND array_length(embedding, 1) = dimension
    )
);
-- Loading one gallery's index for one model, in enrolment order.
CREATE INDEX templates_gallery_model_seq ON templates (gallery_id, model_id, seq);
CREATE INDEX templates_subject ON templates (subject);
CREATE INDEX templates_idempotency_key ON templates (idempotency_key) WHERE idempotency_key IS NOT NULL;

-- Who did what, when, with what outcome. Never an image, never an embedding.
-- Append-only: updates, deletes and truncation are refused by triggers.
CREATE TABLE audit_log (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    actor      TEXT NOT NULL,          -- API key id or client certificate subject
    action     TEXT NOT NULL,          -- enroll, identify, verify, delete_subject, reload_model, ...
    gallery_id TEXT,
    subject_id TEXT,
    model_id   TEXT,
    outcome    TEXT NOT NULL,          -- ok, or the gRPC status code name
    top_score  REAL,
    detail     JSONB NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX audit_log_at ON audit_log (at);

CREATE FUNCTION audit_log_is_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only (% refused)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER audit_log_no_update_delete
    BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_is_append_only();
CREATE TRIGGER audit_log_no_truncate
    BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_is_append_only();
