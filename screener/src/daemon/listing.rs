//! Streamed listings (`block list`, `allow list`, `cache list`): rows go
//! to the admin socket as they are produced, a chunk at a time, so neither
//! the daemon nor the CLI ever holds a listing of a million entries whole.

use std::{net::IpAddr, sync::Arc};

use serde::Serialize;

use super::{give_back_memory, tasks::Tasks};
use crate::{
    admin::{self, Rows},
    verdict::Verdicts,
    xdp,
};

/// How many chunks of rows a listing may have in flight to a slow client.
const LISTING_CHUNKS: usize = 4;
/// Bytes of row lines per chunk.
const CHUNK_BYTES: usize = 64 << 10;

/// What a streamed listing lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Listing {
    /// Block entries: the kernel's, or the store's without XDP.
    Blocks,
    /// Allow entries, the same way.
    Allows,
    /// The temporary allowlist, from the store.
    Cache,
}

/// One row of `cache list`.
#[derive(Serialize)]
struct CacheRow {
    /// The client.
    ip: IpAddr,
    /// Its passes.
    record: crate::store::ClientRecord,
}

/// Sends `rows` to a listing's socket in chunks of row lines, blocking on
/// a slow client; returns how many, or why it stopped. Runs on the
/// blocking pool; gives the memory back to the system when done.
fn stream_rows<T: Serialize>(
    rows: impl IntoIterator<Item = T>,
    tx: &tokio::sync::mpsc::Sender<Rows>,
) -> Result<u64, String> {
    let mut n = 0;
    let mut buf = Vec::with_capacity(CHUNK_BYTES + 1024);
    let mut sent = Ok(());
    for row in rows {
        admin::push_row(&mut buf, &row);
        n += 1;
        if buf.len() >= CHUNK_BYTES {
            let chunk = std::mem::replace(&mut buf, Vec::with_capacity(CHUNK_BYTES + 1024));
            if tx.blocking_send(Rows::Chunk(chunk)).is_err() {
                sent = Err("the client went away".to_owned());
                break;
            }
        }
    }
    if sent.is_ok() && !buf.is_empty() && tx.blocking_send(Rows::Chunk(buf)).is_err() {
        sent = Err("the client went away".to_owned());
    }
    give_back_memory();
    sent.map(|()| n)
}

/// [`stream_rows`] on the blocking pool.
async fn blocking_rows<T, I>(rows: I, tx: &tokio::sync::mpsc::Sender<Rows>) -> Result<u64, String>
where
    T: Serialize,
    I: IntoIterator<Item = T> + Send + 'static,
{
    let tx = tx.clone();
    tokio::task::spawn_blocking(move || stream_rows(rows, &tx))
        .await
        .unwrap_or_else(|e| Err(e.to_string()))
}

/// Which stored blocks other fleet nodes made, by net: the kernel does not
/// know who decided. Empty outside a fleet (no store walk then).
async fn fleet_origins(verdicts: &Verdicts) -> std::collections::HashMap<ipnet::IpNet, String> {
    if verdicts.cluster().is_none() {
        return std::collections::HashMap::new();
    }
    match verdicts.store().blocks().await {
        Ok(all) => all
            .into_iter()
            .filter_map(|b| b.origin.map(|o| (b.net, o)))
            .collect(),
        Err(e) => {
            tracing::debug!("block list: no origins from the store: {e}");
            std::collections::HashMap::new()
        }
    }
}

/// Streams a listing: from the kernel maps when the gate is loaded
/// (through their pins, so the gate's lock is not held while a million
/// entries are walked), else from the store. Rows are serialised on the
/// blocking pool, a chunk at a time, and the memory is given back after.
pub(super) fn start(
    verdicts: Arc<Verdicts>,
    what: Listing,
    tasks: &Tasks,
) -> tokio::sync::mpsc::Receiver<Rows> {
    let (tx, rx) = tokio::sync::mpsc::channel(LISTING_CHUNKS);
    let pins = verdicts.with_gate(|g| g.pin_dir().to_owned());
    tasks.spawn("listing", async move {
        let result = match (what, pins) {
            (Listing::Blocks | Listing::Allows, Some(dir)) => {
                let blocks = what == Listing::Blocks;
                let origins = if blocks {
                    fleet_origins(&verdicts).await
                } else {
                    std::collections::HashMap::new()
                };
                let tx = tx.clone();
                tokio::task::spawn_blocking(move || {
                    let listed = xdp::Maps::from_pins(&dir)
                        .and_then(|m| if blocks { m.blocks() } else { m.allows() })
                        .or_else(|e| {
                            // The pins are gone under a running gate:
                            // its own handles still read the maps.
                            tracing::debug!("listing through the pins: {e}");
                            verdicts
                                .with_gate(|g| {
                                    if blocks {
                                        g.maps.blocks()
                                    } else {
                                        g.maps.allows()
                                    }
                                })
                                .unwrap_or(Err(e))
                        });
                    match listed {
                        Ok(rows) => stream_rows(
                            rows.into_iter().map(|mut l| {
                                l.origin = origins.get(&l.net).cloned();
                                l
                            }),
                            &tx,
                        ),
                        Err(e) => Err(e.to_string()),
                    }
                })
                .await
                .unwrap_or_else(|e| Err(e.to_string()))
            }
            (Listing::Blocks, None) => {
                // Without XDP the store still holds every verdict.
                let now = crate::store::now_unix();
                match verdicts.store().blocks().await {
                    Ok(blocks) => {
                        let rows = blocks
                            .into_iter()
                            .filter(move |b| b.expires == 0 || b.expires > now)
                            .map(move |b| xdp::maps::Listed {
                                net: b.net,
                                reason: b.reason,
                                expires_in: (b.expires != 0).then(|| b.expires - now),
                                hits: 0,
                                map: "store",
                                origin: b.origin,
                            });
                        blocking_rows(rows, &tx).await
                    }
                    Err(e) => Err(e.to_string()),
                }
            }
            (Listing::Allows, None) => match verdicts.store().allows().await {
                Ok(allows) => {
                    let rows = allows.into_iter().map(|a| xdp::maps::Listed {
                        net: a.net,
                        reason: "allow".into(),
                        expires_in: None,
                        hits: 0,
                        map: "store",
                        origin: None,
                    });
                    blocking_rows(rows, &tx).await
                }
                Err(e) => Err(e.to_string()),
            },
            (Listing::Cache, _) => match verdicts.store().clients().await {
                Ok(clients) => {
                    let rows = clients
                        .into_iter()
                        .map(|(ip, record)| CacheRow { ip, record });
                    blocking_rows(rows, &tx).await
                }
                Err(e) => Err(e.to_string()),
            },
        };
        let end = match result {
            Ok(rows) => Rows::End { rows, error: None },
            Err(error) => Rows::End {
                rows: 0,
                error: Some(error),
            },
        };
        let _ = tx.send(end).await;
    });
    rx
}
