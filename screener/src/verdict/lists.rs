//! Imported lists (`screener import`, `import.lists`): a list replaces
//! its previous version as a whole, in the store and then in the kernel.

use std::{sync::Arc, time::Duration};

use ipnet::IpNet;
use screener_common::Reason;

use super::{apply::kernel_expiry, VerdictError, Verdicts};
use crate::{
    store::{now_unix, ListEntries},
    xdp::XdpError,
};

/// Kernel entries an import pushes per hold of the gate's lock: a few
/// milliseconds of syscalls, the longest a verdict on a bot waits.
const KERNEL_BATCH: usize = 1024;

impl Verdicts {
    /// Replaces the import list `name` with `nets`, kernel and store.
    ///
    /// The kernel part runs on the blocking pool in batches, taking the
    /// gate's lock once per batch: a million-entry list must not stall the
    /// runtime's workers, nor the verdicts on bots arriving meanwhile.
    pub async fn import(
        self: &Arc<Self>,
        name: &str,
        nets: Vec<IpNet>,
        ttl: Option<Duration>,
    ) -> Result<crate::store::ListChange, VerdictError> {
        let now = now_unix();
        let expires = ttl.map_or(0, |t| now + t.as_secs().max(1));
        // Verdicts queued while the store failed go first, so the list is
        // judged against what the store really holds; a store that still
        // fails refuses the import.
        self.store.flush().await?;
        let mut change = self
            .store
            .replace_list(
                name,
                ListEntries {
                    nets,
                    reason: Reason::Import.name().to_owned(),
                    expires,
                    added: now,
                },
            )
            .await?;
        let removed = std::mem::take(&mut change.removed_nets);
        let current = std::mem::take(&mut change.current);
        let v = Arc::clone(self);
        let list = name.to_owned();
        let pushed = tokio::task::spawn_blocking(move || {
            let r = v.push_list(&list, &removed, &current, kernel_expiry(expires, now));
            drop((removed, current));
            crate::daemon::give_back_memory();
            r
        })
        .await
        .map_err(|e| VerdictError::Refused(format!("importing {name}: {e}")))?;
        if let Err(e) = pushed {
            self.counters.refused_if_full(&e);
            // The store holds the list; the kernel gets the rest at the
            // next start once there is room.
            return Err(e.into());
        }
        tracing::info!(
            list = name,
            added = change.added,
            removed = change.removed,
            kept = change.kept,
            shadowed = change.shadowed,
            "imported list"
        );
        Ok(change)
    }

    /// Takes `removed` out of the kernel and puts `current` in, a batch
    /// per hold of the gate's lock. Blocking.
    fn push_list(
        &self,
        list: &str,
        removed: &[IpNet],
        current: &[IpNet],
        expires: u32,
    ) -> Result<(), XdpError> {
        for batch in removed.chunks(KERNEL_BATCH) {
            if let Some(r) =
                self.with_gate(|g| batch.iter().try_for_each(|n| g.maps.unblock(*n).map(drop)))
            {
                r?;
            }
        }
        let total = current.len();
        for (i, batch) in current.chunks(KERNEL_BATCH).enumerate() {
            let pushed = self.with_gate(|g| {
                batch
                    .iter()
                    .try_for_each(|n| g.maps.block(*n, Reason::Import, expires))
            });
            match pushed {
                None => return Ok(()),
                Some(r) => r?,
            }
            let done = (i + 1) * KERNEL_BATCH;
            if done % 25_000 < KERNEL_BATCH && done < total {
                tracing::info!(list, "import: {done} of {total} entries in the kernel");
            }
        }
        Ok(())
    }
}
