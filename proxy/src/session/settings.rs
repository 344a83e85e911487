//! The client's settings across servers: applying them, reading back what a transaction
//! changed, and what its resets (`RESET ALL`, `DISCARD ALL`, ...) brought back.

use super::{Session, ROLLBACK_TIMEOUT};
use crate::error::{sqlstate, PgError, Side};
use crate::pool::Lease;
use crate::protocol::backend::TxStatus;
use crate::relay::Flow;
use crate::server::{self, ServerConn};
use crate::sql as state;
use crate::sql::resets::Reset;

impl Session<'_> {
    /// Brings the client's settings (and the server's) up to date with the resets of a relay:
    /// a reset setting is back at its startup value, or at the server's default when the
    /// client gave none (Sluice put the startup values back on the server). Resets whose effect
    /// is uncertain (see [`Flow::resets_unsure`]) add the settings they may have changed to
    /// `changed`, to be read back.
    pub(super) fn after_resets(
        &mut self,
        server: &mut ServerConn,
        flow: &mut Flow,
        changed: &mut Vec<String>,
    ) {
        let resets = std::mem::take(&mut flow.resets);
        if resets.is_empty() {
            return;
        }
        if flow.resets_unsure {
            let mut names: Vec<String> = self
                .startup
                .keys()
                .chain(self.settings.keys())
                .cloned()
                .collect();
            names.extend(resets.into_iter().filter_map(|r| match r {
                Reset::Name(n) => Some(n),
                Reset::All => None,
            }));
            names.retain(|n| state::valid_name(n));
            names.sort();
            names.dedup();
            changed.extend(names);
            return;
        }
        for reset in resets {
            match reset {
                Reset::All => {
                    self.settings.clone_from(&self.startup);
                    server.settings.clone_from(&self.startup);
                }
                Reset::Name(name) => match self.startup.get(&name) {
                    Some(value) => {
                        self.settings.insert(name.clone(), value.clone());
                        server.settings.insert(name, value.clone());
                    }
                    None => {
                        self.settings.remove(&name);
                        server.settings.remove(&name);
                    }
                },
            }
        }
    }

    /// Applies the client's settings on the server of `lease` (session pooling).
    pub(super) async fn apply_settings(
        &self,
        lease: &mut Lease<Box<ServerConn>>,
    ) -> Result<(), PgError> {
        let Some(server) = lease.conn() else {
            return Err(PgError::fatal(
                sqlstate::INTERNAL_ERROR,
                "lease without connection",
            ));
        };
        let sql = state::settings_sql(&self.settings, &server.settings);
        if sql.is_empty() {
            return Ok(());
        }
        let applied = tokio::time::timeout(ROLLBACK_TIMEOUT, server.simple_query(&sql)).await;
        match applied {
            Ok(Ok(TxStatus::Idle)) => {
                server.settings.clone_from(&self.settings);
                Ok(())
            }
            Ok(Err(e)) => Err(server::client_error(&e)),
            _ => Err(PgError::fatal(
                sqlstate::CONNECTION_FAILURE,
                "could not apply the client's startup parameters on its server connection",
            )
            .with_side(Side::Server)),
        }
    }

    /// Records the current values of `names` on `server` as the client's settings (and the
    /// server's). If they cannot be read, the server's settings are forgotten, so the next client
    /// gets them reset rather than inherited.
    pub(super) async fn adopt_settings(&mut self, server: &mut ServerConn, names: &[String]) {
        let sql = state::read_back_sql(names);
        let read = tokio::time::timeout(ROLLBACK_TIMEOUT, server.read_row(&sql)).await;
        let values = read.ok().and_then(Result::ok).and_then(|row| {
            row.iter()
                .map(|v| state::read_back_value(v))
                .collect::<Option<Vec<_>>>()
        });
        match values {
            Some(values) if values.len() == names.len() => {
                for (name, value) in names.iter().zip(values) {
                    self.settings.insert(name.clone(), value.clone());
                    server.settings.insert(name.clone(), value);
                }
            }
            _ => {
                for name in names {
                    server.settings.insert(name.clone(), "\u{0}unknown".into());
                }
            }
        }
    }
}
