-- Idempotency keys are scoped by caller and gallery: two clients (or one
-- client in two galleries) may use the same key without meeting, and a
-- client can never replay, or block, another's enrolment. A replay must
-- also carry the same images: the enrolment records the SHA-256 of its
-- images (`content_sha256`: a digest, never the images; NULL for
-- enrolments stored before this migration, whose keys were global and are
-- not replayed any more).
ALTER TABLE enrollments
    ADD COLUMN id BIGINT GENERATED ALWAYS AS IDENTITY,
    ADD COLUMN caller TEXT,
    ADD COLUMN gallery_id TEXT,
    ADD COLUMN content_sha256 TEXT CHECK (content_sha256 IS NULL OR content_sha256 ~ '^[0-9a-f]{64}$');
UPDATE enrollments e SET caller = '', gallery_id = s.gallery_id FROM subjects s WHERE s.id = e.subject;
ALTER TABLE enrollments
    ALTER COLUMN caller SET NOT NULL,
    ALTER COLUMN gallery_id SET NOT NULL;

-- Templates point at their enrolment by its new id instead of the key.
ALTER TABLE templates ADD COLUMN enrollment BIGINT;
UPDATE templates t SET enrollment = e.id FROM enrollments e WHERE e.idempotency_key = t.idempotency_key;
ALTER TABLE templates DROP CONSTRAINT templates_idempotency_key_fkey;
DROP INDEX templates_idempotency_key;
ALTER TABLE templates DROP COLUMN idempotency_key;

ALTER TABLE enrollments DROP CONSTRAINT enrollments_pkey;
ALTER TABLE enrollments ADD CONSTRAINT enrollments_pkey PRIMARY KEY (id);
ALTER TABLE enrollments ADD CONSTRAINT enrollments_scope_key UNIQUE (caller, gallery_id, idempotency_key);
ALTER TABLE templates ADD CONSTRAINT templates_enrollment_fkey
    FOREIGN KEY (enrollment) REFERENCES enrollments (id) ON DELETE CASCADE;
CREATE INDEX templates_enrollment ON templates (enrollment) WHERE enrollment IS NOT NULL;
