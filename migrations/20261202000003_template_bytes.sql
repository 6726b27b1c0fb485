-- Templates as bytes: `templates.embedding` changes from REAL[] to BYTEA
-- holding the same `dimension` float4 values in PostgreSQL's binary order
-- (big-endian, what float4send writes), one after another.
--
-- Why: loading a 1M-template index read the arrays through array_send,
-- which calls float4send once per element; that took most of the 49 s a
-- 1M-template gallery needed to load. Reading the same vectors as bytes is
-- a copy (measured on 200k x 512 rows: binary COPY 6.2 s as real[], 1.4 s
-- as bytea).
--
-- The column is no wider a channel than the array it replaces: the schema
-- holds it to exactly 4 * dimension bytes, and refuses a NaN or an
-- infinity (a group of four bytes whose exponent bits are all set), as it
-- refused them in the array. It is the one BYTEA column of the schema; the
-- catalogue test allows it and no other.
--
-- The rows stay in the table's own pages: toasting a 2 KiB vector moved it
-- to the TOAST table (a second index lookup per row on every load) and
-- tried to compress values that do not compress.

ALTER TABLE templates DROP CONSTRAINT templates_embedding_dimension;
ALTER TABLE templates DROP CONSTRAINT templates_embedding_finite;

-- Each element's float4send, in order. A NULL element (which no index
-- could hold) would leave the vector short and fail the length check below.
-- About 0.2 ms a row (measured on 20k rows x 512): a one-time cost of some
-- 4 minutes for a million templates.
CREATE FUNCTION pg_temp.float4_bytes(v REAL[]) RETURNS BYTEA LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT coalesce(string_agg(float4send(x), ''::bytea ORDER BY i), ''::bytea)
    FROM unnest(v) WITH ORDINALITY AS u (x, i)
$$;

ALTER TABLE templates SET (toast_tuple_target = 8160);
ALTER TABLE templates
    ALTER COLUMN embedding TYPE BYTEA USING pg_temp.float4_bytes(embedding),
    ALTER COLUMN embedding SET STORAGE EXTERNAL;
DROP FUNCTION pg_temp.float4_bytes(REAL[]);

ALTER TABLE templates ADD CONSTRAINT templates_embedding_dimension
    CHECK (octet_length(embedding) = 4 * dimension);
-- In hex, a non-finite float4 starts 7f or ff, then a digit 8-f.
ALTER TABLE templates ADD CONSTRAINT templates_embedding_finite
    CHECK (encode(embedding, 'hex') !~ '^(?:.{8})*[7f]f[89a-f]');
