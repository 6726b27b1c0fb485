-- Hot reloads and several replicas on one database.
--
-- 1. `models` records every load, not only the first: a reload (ReloadModel,
--    SIGHUP) or a promotion bumps `load_count` and `last_loaded_at`, and
--    `role` says what the model became the last time (active or staged).
-- 2. `changes`: one row per subject whose templates changed (enrolment,
--    deletion) and per deleted gallery, numbered by a strictly increasing
--    `seq`. Rows are written by triggers, in the writing transaction, so
--    every writer (the service, bulk loaders, an operator's SQL) is seen.
--    Each row is announced with NOTIFY handid_changes (delivered at commit);
--    a replica applies changes in `seq` order, remembers the last one, and
--    after a dropped listener or on its periodic check re-reads every change
--    past it, so a missed notification only delays a change.

ALTER TABLE models
    ADD COLUMN last_loaded_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    ADD COLUMN load_count     BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN role           TEXT NOT NULL DEFAULT 'active' CHECK (role IN ('active', 'staged', 'retired'));

CREATE TABLE changes (
    seq        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- `subject`: re-read this subject's templates; `gallery`: the gallery
    -- was deleted (its subjects' own rows follow or precede it).
    kind       TEXT NOT NULL CHECK (kind IN ('subject', 'gallery')),
    gallery_id TEXT NOT NULL,
    subject_id TEXT,
    at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK ((kind = 'subject') = (subject_id IS NOT NULL))
);
CREATE INDEX changes_at ON changes (at);

-- Records the changes of one statement and announces them: one
-- notification per change (gallery, subject, change number) for the usual
-- small statement, one for the whole range of numbers when a bulk statement
-- changed more than 100 subjects (a million notifications would only slow
-- the load; replicas read the table either way).
--
-- Numbering must follow commit order, or a replica that has read change
-- n + 1 (committed first) would never go back for n (committed later). The
-- transaction-scoped advisory lock makes writing transactions take their
-- numbers one after another and keep them until commit: writers of changes
-- serialise from their first change to their commit, which in this service
-- is the end of a short enrolment or deletion transaction.
CREATE FUNCTION handid_record_changes(new_kind TEXT, rows JSONB) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    c RECORD;
    first_seq BIGINT;
    last_seq BIGINT;
    changed BIGINT;
BEGIN
    IF jsonb_array_length(rows) = 0 THEN
        RETURN;
    END IF;
    PERFORM pg_advisory_xact_lock(7460373270431950001);
    IF jsonb_array_length(rows) <= 100 THEN
        FOR c IN
            INSERT INTO changes (kind, gallery_id, subject_id)
            SELECT DISTINCT new_kind, r->>'gallery_id', r->>'subject_id'
            FROM jsonb_array_elements(rows) AS r
            ORDER BY 2, 3
            RETURNING seq, kind, gallery_id, subject_id
        LOOP
            PERFORM pg_notify('handid_changes', json_build_object(
                'seq', c.seq, 'kind', c.kind, 'gallery_id', c.gallery_id, 'subject_id', c.subject_id
            )::text);
        END LOOP;
    ELSE
        WITH inserted AS (
            INSERT INTO changes (kind, gallery_id, subject_id)
            SELECT DISTINCT new_kind, r->>'gallery_id', r->>'subject_id'
            FROM jsonb_array_elements(rows) AS r
            ORDER BY 2, 3
            RETURNING seq
        )
        SELECT min(seq), max(seq), count(*) INTO first_seq, last_seq, changed FROM inserted;
        PERFORM pg_notify('handid_changes', json_build_object(
            'first_seq', first_seq, 'seq', last_seq, 'kind', new_kind, 'changes', changed
        )::text);
    END IF;
END;
$$;

CREATE FUNCTION handid_templates_inserted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM handid_record_changes('subject', (
        SELECT coalesce(jsonb_agg(jsonb_build_object('gallery_id', n.gallery_id, 'subject_id', s.subject_id)), '[]')
        FROM new_rows n JOIN subjects s ON s.id = n.subject
    ));
    RETURN NULL;
END;
$$;

CREATE FUNCTION handid_subjects_deleted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM handid_record_changes('subject', (
        SELECT coalesce(jsonb_agg(jsonb_build_object('gallery_id', o.gallery_id, 'subject_id', o.subject_id)), '[]')
        FROM old_rows o
    ));
    RETURN NULL;
END;
$$;

CREATE FUNCTION handid_galleries_deleted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM handid_record_changes('gallery', (
        SELECT coalesce(jsonb_agg(jsonb_build_object('gallery_id', o.gallery_id)), '[]')
        FROM old_rows o
    ));
    RETURN NULL;
END;
$$;

-- Statement-level triggers with transition tables: a bulk insert records one
-- change per subject, not one per template.
CREATE TRIGGER templates_changes AFTER INSERT ON templates
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION handid_templates_inserted();
CREATE TRIGGER subjects_changes AFTER DELETE ON subjects
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION handid_subjects_deleted();
CREATE TRIGGER galleries_changes AFTER DELETE ON galleries
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION handid_galleries_deleted();
