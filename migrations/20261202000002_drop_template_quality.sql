-- `templates.quality` held a constant 1.0: no quality estimator stood behind
-- it, so the API no longer reports it (TemplateInfo field 3 is reserved) and
-- the column goes. An estimate, when one exists, comes back as a new column
-- with its method documented.
ALTER TABLE templates DROP COLUMN quality;
