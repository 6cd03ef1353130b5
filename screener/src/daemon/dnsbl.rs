//! The daemon's side of DNSBL scoring: the engine built from the
//! configuration, and the adapter that hands it to the SMTP sessions.

use std::{net::IpAddr, sync::Arc};

use anyhow::Context as _;

use crate::{
    config::Config,
    dnsbl::{Dnsbl, DnsblOptions, SiteSpec},
    smtp,
    verdict::Verdicts,
};

/// The DNSBL engine from the `screen.dnsbl_*` and `dns` settings; `None`
/// when no site is configured.
pub(super) fn build_dnsbl(cfg: &Config) -> anyhow::Result<Option<Dnsbl>> {
    let s = &cfg.screen;
    if s.dnsbl_sites.is_empty() {
        return Ok(None);
    }
    let sites = s
        .dnsbl_sites
        .iter()
        .map(|t| t.parse::<SiteSpec>())
        .collect::<Result<Vec<_>, _>>()
        .context("screen.dnsbl_sites")?;
    let opts = DnsblOptions {
        sites,
        nameservers: cfg.dns.nameservers.clone(),
        timeout: s.dnsbl_timeout,
        min_ttl: s.dnsbl_min_ttl,
        max_ttl: s.dnsbl_max_ttl,
        reply_map: s.dnsbl_reply_map.clone(),
        health_interval: s.dnsbl_health_interval,
        health_skip: s.dnsbl_health_skip.clone(),
    };
    Ok(Some(Dnsbl::new(opts).context("DNSBL settings")?))
}

/// Connects the SMTP sessions to the DNSBL engine, and notes clients a
/// DNSWL allowlisted so no verdict ever covers them.
struct DnsblAdapter {
    /// The engine that scores.
    dnsbl: Dnsbl,
    /// Where DNSWL-allowlisted clients are noted.
    verdicts: Arc<Verdicts>,
}

impl smtp::DnsblLookup for DnsblAdapter {
    fn score(&self, ip: IpAddr, deadline: tokio::time::Instant) -> smtp::ScoreFuture {
        let dnsbl = self.dnsbl.clone();
        let verdicts = self.verdicts.clone();
        Box::pin(async move {
            let s = dnsbl.score(ip, deadline).await;
            if s.is_allowlisted(verdicts.cfg().screen.dnsbl_allowlist_threshold) {
                verdicts.note_dnswl(ip);
            }
            Some(smtp::DnsblScore {
                score: s.score,
                ttl: s.ttl,
                top_site: s.top_site,
            })
        })
    }
}

/// The SMTP server's view of `dnsbl`, noting DNSWL-allowlisted clients.
pub(super) fn lookup(
    dnsbl: Option<&Dnsbl>,
    verdicts: &Arc<Verdicts>,
) -> Option<Arc<dyn smtp::DnsblLookup>> {
    dnsbl.map(|d| {
        Arc::new(DnsblAdapter {
            dnsbl: d.clone(),
            verdicts: verdicts.clone(),
        }) as Arc<dyn smtp::DnsblLookup>
    })
}
