-- Templates mapped from another model's templates (issue #18): an operator
-- upgrades stored templates into a new model's embedding space with a
-- template transformation (Ramanujan et al., "Forward Compatible Training
-- for Large-Scale Embedding Retrieval Systems", NeurIPS 2022), without an
-- image: `handid-server upgrade-templates --transform T`.
--
-- `derived_from` names the template a row was computed from. It makes the
-- upgrade resumable and idempotent: a template of the old model is done
-- when a row of the new model derived from it exists, and the unique index
-- refuses a second one (two runs at once, or a run repeated after a crash,
-- insert each template once). A derived template goes with its source: a
-- deleted subject loses both through the subject's cascade anyway; the
-- reference's own cascade covers a source deleted by other means.
ALTER TABLE templates ADD COLUMN derived_from UUID
    REFERENCES templates (template_id) ON DELETE CASCADE;
CREATE UNIQUE INDEX templates_derived_once ON templates (derived_from, model_id)
    WHERE derived_from IS NOT NULL;
-- The upgrade walks one model's templates in enrolment order.
CREATE INDEX templates_model_seq ON templates (model_id, seq);
