-- The serving model is the database's: `models` records which model is
-- active and which is staged, and the checkpoint folder each was last loaded
-- from (`path`). At start the server compares the model of `model.path`
-- with the recorded active one and refuses a disagreement unless told to
-- adopt the folder's model.
--
-- At most one model is active and one staged at any time: every swap,
-- staging and promotion retires the model it replaces (before this
-- migration a swap left every model it had ever loaded `active`). Rows
-- recorded without a role are retired until a load marks them.
ALTER TABLE models ADD COLUMN path TEXT;
-- When the model stopped being the active one (NULL: never replaced while
-- active). The most recent is the model RollbackModel goes back to.
ALTER TABLE models ADD COLUMN active_until TIMESTAMPTZ;
ALTER TABLE models ALTER COLUMN role SET DEFAULT 'retired';

-- Of the models marked active (or staged), the one loaded last keeps its role.
UPDATE models m SET role = 'retired',
    active_until = CASE WHEN m.role = 'active' THEN m.last_loaded_at END
WHERE m.role IN ('active', 'staged')
  AND EXISTS (
      SELECT 1 FROM models n
      WHERE n.role = m.role
        AND (n.last_loaded_at, n.model_id) > (m.last_loaded_at, m.model_id)
  );

CREATE UNIQUE INDEX models_one_per_role ON models (role) WHERE role IN ('active', 'staged');

-- The service already has SELECT, INSERT, UPDATE on `models` (roles
-- migration): the new column is covered.
