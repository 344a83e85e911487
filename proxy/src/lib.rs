//! Sluice: a PostgreSQL connection-pooling proxy.
