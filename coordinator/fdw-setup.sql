-- The postgres_fdw coordinator of coordinator/controller.toml: run once, as a superuser.
-- Generated: xcha coordinator fdw-sql --datanode dn1=192.0.2.11:5432 --datanode dn2=192.0.2.21:5432
-- Replace CHANGE-ME (or pass --password-file). The fdw router later re-points the servers.
CREATE EXTENSION IF NOT EXISTS postgres_fdw;
CREATE SERVER "dn1" FOREIGN DATA WRAPPER postgres_fdw OPTIONS (host '192.0.2.11', port '5432', dbname 'postgres');
CREATE USER MAPPING FOR PUBLIC SERVER "dn1" OPTIONS (user 'xcha_app', password 'CHANGE-ME');
GRANT USAGE ON FOREIGN SERVER "dn1" TO "xcha_app";
CREATE SERVER "dn2" FOREIGN DATA WRAPPER postgres_fdw OPTIONS (host '192.0.2.21', port '5432', dbname 'postgres');
CREATE USER MAPPING FOR PUBLIC SERVER "dn2" OPTIONS (user 'xcha_app', password 'CHANGE-ME');
GRANT USAGE ON FOREIGN SERVER "dn2" TO "xcha_app";
CREATE TABLE "xcha_writes" (id bigint NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp()) PARTITION BY HASH (id);
CREATE FOREIGN TABLE "xcha_writes_dn1" PARTITION OF "xcha_writes" FOR VALUES WITH (MODULUS 2, REMAINDER 0) SERVER "dn1" OPTIONS (table_name 'xcha_writes');
CREATE FOREIGN TABLE "xcha_writes_dn2" PARTITION OF "xcha_writes" FOR VALUES WITH (MODULUS 2, REMAINDER 1) SERVER "dn2" OPTIONS (table_name 'xcha_writes');
GRANT SELECT, INSERT ON "xcha_writes" TO "xcha_app";
