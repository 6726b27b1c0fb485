-- The service's database login, made once by the postgres image on its
-- first start (mounted into /docker-entrypoint-initdb.d by compose.yaml).
-- The image's POSTGRES_USER owns the schema and runs the migrations, which
-- grant `handid_app` exactly what the service needs: it may read and write
-- its tables, but only append to the audit log.
CREATE ROLE handid_app NOLOGIN;
CREATE ROLE handid_server LOGIN PASSWORD 'handid_server' IN ROLE handid_app;
