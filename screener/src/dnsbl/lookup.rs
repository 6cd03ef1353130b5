//! Building DNSBL query names and asking DNS for them.
//!
//! Every query goes through the [`Source`] trait so the scoring engine can be
//! driven with scripted answers under paused time; the daemon's source is
//! hickory-resolver with its own cache off (the engine caches answers with
//! their TTLs itself, per list and client).
//!
//! SECRET DOMAINS. A paid feed's query domain carries its key. Hickory's
//! error messages contain the query name, so they are never logged here:
//! failures are reduced to a [`Failure`] kind first.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use futures::future::BoxFuture;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{Name, RData, RecordType};
use hickory_proto::xfer::Protocol;
use hickory_proto::ProtoErrorKind;
use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::{ResolveError, Resolver, TokioResolver};

use super::answer::{Answer, Failure};

/// Where A answers come from.
pub(crate) trait Source: Send + Sync + 'static {
    /// Looks up the A records of `name` (fully qualified, trailing dot).
    fn query(&self, name: String) -> BoxFuture<'static, Answer>;
}

/// The query name for `ip` under `domain`: reversed octets for IPv4,
/// reversed nibbles for IPv6 (RFC 5782), with a trailing dot so that no
/// search domain is ever appended.
pub(crate) fn query_name(ip: IpAddr, domain: &str) -> String {
    let mut name = String::with_capacity(72 + domain.len());
    match ip {
        IpAddr::V4(v4) => {
            for octet in v4.octets().iter().rev() {
                let _ = write!(name, "{octet}.");
            }
        }
        IpAddr::V6(v6) => {
            for byte in v6.octets().iter().rev() {
                let _ = write!(name, "{:x}.{:x}.", byte & 0xf, byte >> 4);
            }
        }
    }
    name.push_str(domain);
    name.push('.');
    name
}

/// hickory-resolver, configured for DNSBL queries.
pub(crate) struct Hickory {
    /// Shared by every query; clones share its connections.
    resolver: TokioResolver,
}

impl Hickory {
    /// A resolver for `nameservers` (UDP, TCP for truncated replies), or the
    /// system's configuration if the list is empty. `timeout` bounds one
    /// attempt; the engine bounds the whole lookup.
    pub(crate) fn new(nameservers: &[SocketAddr], timeout: Duration) -> Result<Self, ResolveError> {
        let mut builder = if nameservers.is_empty() {
            Resolver::builder_tokio()?
        } else {
            let mut config = ResolverConfig::new();
            for &addr in nameservers {
                for protocol in [Protocol::Udp, Protocol::Tcp] {
                    let mut ns = NameServerConfig::new(addr, protocol);
                    // A list's NXDOMAIN is its answer; asking the next
                    // server would only add latency.
                    ns.trust_negative_responses = true;
                    config.add_name_server(ns);
                }
            }
            Resolver::builder_with_config(config, TokioConnectionProvider::default())
        };
        let opts = builder.options_mut();
        opts.timeout = timeout;
        opts.attempts = 2;
        // The engine keeps its own TTL-honouring cache.
        opts.cache_size = 0;
        opts.use_hosts_file = ResolveHosts::Never;
        opts.preserve_intermediates = false;
        Ok(Hickory {
            resolver: builder.build(),
        })
    }
}

impl Source for Hickory {
    fn query(&self, name: String) -> BoxFuture<'static, Answer> {
        let resolver = self.resolver.clone();
        Box::pin(async move {
            let Ok(name) = Name::from_ascii(&name) else {
                return Answer::Failed(Failure::BadName);
            };
            match resolver.lookup(name, RecordType::A).await {
                Ok(lookup) => {
                    let mut addrs = Vec::new();
                    let mut ttl = u32::MAX;
                    for record in lookup.records() {
                        if let RData::A(a) = record.data() {
                            addrs.push(a.0);
                            ttl = ttl.min(record.ttl());
                        }
                    }
                    if addrs.is_empty() {
                        Answer::NotListed { negative_ttl: None }
                    } else {
                        Answer::Listed { addrs, ttl }
                    }
                }
                Err(e) => classify_error(&e),
            }
        })
    }
}

/// Turns a resolver error into "not listed" (NXDOMAIN, NODATA) or a failure.
fn classify_error(e: &ResolveError) -> Answer {
    let Some(proto) = e.proto() else {
        return Answer::Failed(Failure::Transport);
    };
    match proto.kind() {
        ProtoErrorKind::NoRecordsFound {
            response_code: ResponseCode::NXDomain | ResponseCode::NoError,
            negative_ttl,
            ..
        } => Answer::NotListed {
            negative_ttl: *negative_ttl,
        },
        ProtoErrorKind::NoRecordsFound { response_code, .. } => {
            Answer::Failed(Failure::Rcode(*response_code))
        }
        ProtoErrorKind::Timeout => Answer::Failed(Failure::Timeout),
        _ => Answer::Failed(Failure::Transport),
    }
}

/// Test double: answers from a closure, after an optional delay, counting
/// queries per name.
#[cfg(test)]
pub(crate) mod scripted {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use std::sync::Arc;

    use super::{Answer, BoxFuture, Duration, Source};

    type Script = dyn Fn(&str) -> (Answer, Duration) + Send + Sync;

    pub(crate) struct Scripted {
        script: Mutex<Arc<Script>>,
        pub(crate) asked: Mutex<HashMap<String, usize>>,
    }

    impl Scripted {
        pub(crate) fn new(
            script: impl Fn(&str) -> (Answer, Duration) + Send + Sync + 'static,
        ) -> Arc<Self> {
            Arc::new(Scripted {
                script: Mutex::new(Arc::new(script)),
                asked: Mutex::default(),
            })
        }

        pub(crate) fn set(
            &self,
            script: impl Fn(&str) -> (Answer, Duration) + Send + Sync + 'static,
        ) {
            *self.script.lock().unwrap() = Arc::new(script);
        }

        pub(crate) fn count(&self, name: &str) -> usize {
            self.asked.lock().unwrap().get(name).copied().unwrap_or(0)
        }
    }

    impl Source for Scripted {
        fn query(&self, name: String) -> BoxFuture<'static, Answer> {
            *self.asked.lock().unwrap().entry(name.clone()).or_default() += 1;
            let script = Arc::clone(&self.script.lock().unwrap());
            Box::pin(async move {
                let (answer, delay) = script(&name);
                tokio::time::sleep(delay).await;
                answer
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_names_are_reversed_octets() {
        assert_eq!(
            query_name("192.0.2.99".parse().unwrap(), "zen.example"),
            "99.2.0.192.zen.example."
        );
    }

    #[test]
    fn ipv6_names_are_reversed_nibbles() {
        // The RFC 5782 example address.
        assert_eq!(
            query_name("2001:db8:1:2:3:4:567:89ab".parse().unwrap(), "bl.example"),
            "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.bl.example."
        );
        assert_eq!(
            query_name("::ffff:7f00:2".parse().unwrap(), "bl.example"),
            "2.0.0.0.0.0.f.7.f.f.f.f.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.bl.example."
        );
    }
}
