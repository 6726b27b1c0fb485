//! End-to-end tests of handid across crates, against a real PostgreSQL and a
//! real server on a local port. The tests live in `tests/`; run them through
//! `scripts/test.sh`, which starts a throwaway cluster and sets
//! `DATABASE_URL`.
