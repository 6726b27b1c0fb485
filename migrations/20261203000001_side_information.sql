-- Side-information beside templates (issue #18): forward-compatible
-- training's template transformation may take, besides an old template,
-- a second feature of the same image from a side-information model
-- (Ramanujan et al., "Forward Compatible Training for Large-Scale Embedding
-- Retrieval Systems", CVPR 2022, sec. 3.2). The image is gone once it is
-- enrolled, so that feature must be computed at enrolment and kept: a
-- server with `model.side_info` stores one row here per template it
-- enrols, and `handid-server upgrade-templates` gives it to the transform.
--
-- It is an embedding like the template it belongs to (never an image),
-- held by the schema to `dimension` finite values. A template's side row
-- goes with it (a deleted subject, a cancelled migration), and a template
-- derived by an upgrade gets a copy of its source's row: the feature
-- describes the image, whichever model's template it is, so the next
-- upgrade can use it too.
--
-- `side_model` is the side-information model's id (the hash of its
-- weights); it is not a row of `models`, which records the models that
-- serve.
CREATE TABLE template_side_info (
    template_id UUID PRIMARY KEY REFERENCES templates (template_id) ON DELETE CASCADE,
    side_model  TEXT NOT NULL CHECK (side_model ~ '^[0-9a-f]{64}$'),
    dimension   INTEGER NOT NULL CHECK (dimension > 0),
    feature     REAL[] NOT NULL,
    CONSTRAINT template_side_info_dimension CHECK (
        array_ndims(feature) = 1 AND array_length(feature, 1) = dimension
    ),
    CONSTRAINT template_side_info_finite
        CHECK (NOT (feature && ARRAY['NaN', 'Infinity', '-Infinity']::real[]))
);

-- Written with its template; read by upgrades; deleted only through the
-- templates' cascade.
GRANT SELECT, INSERT ON template_side_info TO handid_app;
