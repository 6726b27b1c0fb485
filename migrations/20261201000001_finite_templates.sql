-- A template is a unit vector: a NaN or an infinity in one is a fault
-- upstream (the service refuses such embeddings before they get here), and
-- one stored would poison every search of its gallery. The database refuses
-- them too, whoever writes. PostgreSQL compares NaN equal to NaN, so the
-- overlap test finds it.
ALTER TABLE templates ADD CONSTRAINT templates_embedding_finite
    CHECK (NOT (embedding && ARRAY['NaN', 'Infinity', '-Infinity']::real[]));
