//! The fleet link on its own, against a real redis-server: what one node
//! publishes reaches the others, a node that was away catches up (from
//! the stream, or from the snapshot once the stream was trimmed), passes
//! are shared, and a Redis outage loses nothing this node published.

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use integration_tests::redis::Redis;
use ipnet::IpNet;
use screener::cluster::{Cluster, Event, Incoming, Op, Settings};
use tokio::{sync::mpsc, task::JoinHandle};
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(20);

fn settings(redis: &Redis, node: &str) -> Settings {
    Settings {
        redis: vec![redis.url()],
        node: node.into(),
        prefix: format!("t{}", std::process::id()),
        stream_length: 1000,
        ..Settings::default()
    }
}

/// A node: its handle, what it was asked to apply, and its tasks.
struct Node {
    cluster: Cluster,
    rx: mpsc::Receiver<Incoming>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Node {
    fn start(s: Settings, last_id: Option<String>) -> Node {
        let cluster = Cluster::new(s);
        let (tx, rx) = mpsc::channel(16);
        let stop = CancellationToken::new();
        let c = cluster.clone();
        let st = stop.clone();
        let task = tokio::spawn(async move { c.run(last_id, tx, st).await });
        Node {
            cluster,
            rx,
            stop,
            task,
        }
    }

    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("the cluster tasks did not stop")
            .unwrap();
    }

    /// The next non-empty batch of remote events (snapshots and empty
    /// batches are acknowledged and skipped).
    async fn next_events(&mut self) -> Vec<Event> {
        loop {
            let msg = tokio::time::timeout(DEADLINE, self.rx.recv())
                .await
                .expect("nothing arrived")
                .expect("the cluster stopped");
            match msg {
                Incoming::Events { events, done, .. } => {
                    let _ = done.send(());
                    if !events.is_empty() {
                        return events;
                    }
                }
                Incoming::Snapshot { done, .. } => {
                    let _ = done.send(());
                }
            }
        }
    }

    /// Applies what arrives until `done(applied set)`; returns the last
    /// position acknowledged and whether a snapshot came.
    async fn apply_until(
        &mut self,
        set: &mut BTreeMap<IpNet, String>,
        mut done: impl FnMut(&BTreeMap<IpNet, String>) -> bool,
    ) -> (Option<String>, bool) {
        let mut last = None;
        let mut snapshot = false;
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while !done(set) {
            let msg = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .unwrap_or_else(|_| panic!("timed out; applied so far: {}", set.len()))
                .expect("the cluster stopped");
            match msg {
                Incoming::Events {
                    events,
                    last_id,
                    done,
                } => {
                    for e in events {
                        apply(set, e);
                    }
                    last = Some(last_id);
                    let _ = done.send(());
                }
                Incoming::Snapshot {
                    blocks,
                    last_id,
                    done,
                } => {
                    snapshot = true;
                    set.clear();
                    for e in blocks {
                        apply(set, e);
                    }
                    last = Some(last_id);
                    let _ = done.send(());
                }
            }
        }
        (last, snapshot)
    }
}

fn apply(set: &mut BTreeMap<IpNet, String>, e: Event) {
    match e.op {
        Op::Block { reason, .. } => {
            set.insert(e.net, format!("{reason} from {}", e.node));
        }
        Op::Unblock => {
            set.remove(&e.net);
        }
    }
}

fn block(node: &str, net: &str) -> Event {
    Event {
        net: net.parse().unwrap(),
        op: Op::Block {
            reason: "pregreet".into(),
            expires: 4_000_000_000,
        },
        node: node.into(),
    }
}

fn unblock(node: &str, net: &str) -> Event {
    Event {
        net: net.parse().unwrap(),
        op: Op::Unblock,
        node: node.into(),
    }
}

async fn wait(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `n` distinct host networks in `198.51.100.0/24` and `2001:db8:77::/48`.
fn nets(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            if i < 256 {
                format!("198.51.100.{i}/32")
            } else {
                format!("2001:db8:77::{i:x}/128")
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_and_an_unblock_reach_the_other_node_and_not_the_sender() {
    let redis = Redis::start();
    let mut mx1 = Node::start(settings(&redis, "mx1"), None);
    let mut mx2 = Node::start(settings(&redis, "mx2"), None);
    wait("both connected", || {
        mx1.cluster.status().connected && mx2.cluster.status().connected
    })
    .await;

    mx1.cluster.publish(block("mx1", "192.0.2.66/32"));
    let got = mx2.next_events().await;
    assert_eq!(got, vec![block("mx1", "192.0.2.66/32")]);
    let key = format!("t{}:block:192.0.2.66/32", std::process::id());
    assert_eq!(redis.cli(&["EXISTS", &key]).unwrap().trim(), "1");

    mx2.cluster.publish(unblock("mx2", "192.0.2.66/32"));
    // mx1 never gets its own block back: the first thing it is asked to
    // apply is mx2's unblock.
    let got = mx1.next_events().await;
    assert_eq!(got, vec![unblock("mx2", "192.0.2.66/32")]);
    assert_eq!(redis.cli(&["EXISTS", &key]).unwrap().trim(), "0");
    assert_eq!(mx1.cluster.status().published, 1);
    assert_eq!(mx2.cluster.status().applied, 1);
    mx1.stop().await;
    mx2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_was_away_replays_what_it_missed() {
    let redis = Redis::start();
    let mx1 = Node::start(settings(&redis, "mx1"), None);
    let mut mx3 = Node::start(settings(&redis, "mx3"), None);
    let mut seen = BTreeMap::default();
    wait("mx1 connected", || mx1.cluster.status().connected).await;
    mx1.cluster.publish(block("mx1", "203.0.113.1/32"));
    let (last, _) = mx3.apply_until(&mut seen, |s| s.len() == 1).await;
    mx3.stop().await;

    // 500 verdicts while mx3 is away: within the stream's length.
    for n in nets(500) {
        mx1.cluster.publish(block("mx1", &n));
    }
    mx1.cluster.publish(unblock("mx1", "203.0.113.1/32"));
    wait("mx1 published", || mx1.cluster.status().queued == 0).await;

    let mut mx3 = Node::start(settings(&redis, "mx3"), last);
    let (_, snapshot) = mx3
        .apply_until(&mut seen, |s| {
            s.len() == 500 && !s.contains_key(&"203.0.113.1/32".parse().unwrap())
        })
        .await;
    assert!(!snapshot, "the replay came from a snapshot, not the stream");
    mx1.stop().await;
    mx3.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_behind_a_trimmed_stream_resynchronises_to_the_same_set() {
    let redis = Redis::start();
    let mx1 = Node::start(settings(&redis, "mx1"), None);
    let mut mx3 = Node::start(settings(&redis, "mx3"), None);
    let mut seen = BTreeMap::default();
    wait("mx1 connected", || mx1.cluster.status().connected).await;
    mx1.cluster.publish(block("mx1", "203.0.113.1/32"));
    mx1.cluster.publish(block("mx1", "203.0.113.2/32"));
    let (last, _) = mx3.apply_until(&mut seen, |s| s.len() == 2).await;
    mx3.stop().await;

    // Far more than the stream keeps (1000): mx3's place is trimmed away,
    // and with it the unblock of .1.
    mx1.cluster.publish(unblock("mx1", "203.0.113.1/32"));
    let many = nets(3000);
    for n in &many {
        mx1.cluster.publish(block("mx1", n));
    }
    wait("mx1 published", || mx1.cluster.status().queued == 0).await;
    let len: u64 = redis
        .cli(&["XLEN", &format!("t{}:verdicts", std::process::id())])
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(len < 3000, "the stream was not trimmed: {len}");

    let mut mx3 = Node::start(settings(&redis, "mx3"), last);
    let (_, snapshot) = mx3.apply_until(&mut seen, |s| s.len() == 3001).await;
    assert!(snapshot, "mx3 did not resynchronise from the snapshot");
    assert!(!seen.contains_key(&"203.0.113.1/32".parse().unwrap()));
    assert!(seen.contains_key(&"203.0.113.2/32".parse().unwrap()));
    assert_eq!(mx3.cluster.status().resyncs, 1);
    mx1.stop().await;
    mx3.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_are_shared_and_a_dead_redis_answers_none() {
    let mut redis = Redis::start();
    let mx1 = Node::start(settings(&redis, "mx1"), None);
    let mx2 = Node::start(settings(&redis, "mx2"), None);
    wait("both connected", || {
        mx1.cluster.status().connected && mx2.cluster.status().connected
    })
    .await;
    let ip: IpAddr = "198.51.100.25".parse().unwrap();
    assert_eq!(mx2.cluster.passes(ip).await, None);
    let until = 4_000_000_000;
    mx1.cluster
        .publish_pass(ip, &[("pregreet", until), ("dnsbl", until - 5)]);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let got = loop {
        if let Some(p) = mx2.cluster.passes(ip).await {
            break p;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the pass never arrived"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        got,
        vec![
            ("pregreet".to_owned(), until),
            ("dnsbl".to_owned(), until - 5)
        ]
    );

    redis.stop();
    // Whatever the link's state, a lookup comes back (None) instead of
    // waiting for Redis.
    for _ in 0..3 {
        assert_eq!(mx2.cluster.passes(ip).await, None);
    }
    mx1.stop().await;
    mx2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verdicts_made_during_an_outage_reach_the_fleet_after_it() {
    let mut redis = Redis::start();
    let mx1 = Node::start(settings(&redis, "mx1"), None);
    let mut mx2 = Node::start(settings(&redis, "mx2"), None);
    let mut seen = BTreeMap::default();
    wait("mx1 connected", || mx1.cluster.status().connected).await;
    mx1.cluster.publish(block("mx1", "192.0.2.200/32"));
    mx2.apply_until(&mut seen, |s| s.len() == 1).await;

    redis.stop();
    for n in nets(20) {
        mx1.cluster.publish(block("mx1", &n));
    }
    wait("mx1 noticed the outage", || !mx1.cluster.status().connected).await;
    assert_eq!(mx1.cluster.status().queued, 20);

    redis.resume();
    mx2.apply_until(&mut seen, |s| s.len() == 21).await;
    wait("mx1 queue drained", || mx1.cluster.status().queued == 0).await;
    assert!(mx1.cluster.status().connected);
    mx1.stop().await;
    mx2.stop().await;
}
