//! The embedded adapter against a real SQLite database file. Every test makes
//! its own file in the temporary directory (removed at the end), so tests run
//! in parallel; the crash test SIGKILLs a child process that holds the queue.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::{Stream, StreamExt};
use hookline_broker::{
    Broker, BrokerError, ChangeNotice, EmbeddedBroker, EmbeddedConfig, OutgoingMessage, QueueName,
    ReceivedMessage,
};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// How long any awaited condition may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(60);

/// A database file of its own, removed (with its WAL files) on drop.
struct TestDb {
    path: PathBuf,
}

impl TestDb {
    fn new() -> Self {
        let name = format!("hookline-broker-test-{}.db", ulid::Ulid::new());
        Self {
            path: std::env::temp_dir().join(name),
        }
    }

    async fn pool(&self) -> SqlitePool {
        pool_at(&self.path).await
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let mut path = self.path.clone().into_os_string();
            path.push(suffix);
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A pool as the embedded mode opens one: WAL, synchronous=NORMAL (enough for
/// a process crash; `HOOKLINE_TEST_SQLITE_SYNC=full` to measure FULL), a busy
/// timeout.
async fn pool_at(path: &Path) -> SqlitePool {
    let synchronous = match std::env::var("HOOKLINE_TEST_SQLITE_SYNC").as_deref() {
        Ok("full") => SqliteSynchronous::Full,
        _ => SqliteSynchronous::Normal,
    };
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(synchronous)
        .busy_timeout(Duration::from_secs(5));
    SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await
        .expect("open the test database")
}

async fn open(pool: &SqlitePool) -> EmbeddedBroker {
    open_with(pool, EmbeddedConfig::default()).await
}

async fn open_with(pool: &SqlitePool, cfg: EmbeddedConfig) -> EmbeddedBroker {
    EmbeddedBroker::open(pool.clone(), cfg)
        .await
        .expect("open the embedded queue")
}

/// Awaits `fut`, failing the test if it takes longer than [`DEADLINE`].
async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(DEADLINE, fut).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {DEADLINE:?} waiting for {what}"),
    }
}

/// The next item of a stream that must not end.
async fn next<S: Stream + Unpin>(stream: &mut S, what: &str) -> S::Item {
    within(what, stream.next())
        .await
        .unwrap_or_else(|| panic!("stream ended while waiting for {what}"))
}

/// Polls `check` (every 20 ms) until it returns true, failing at the deadline.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    within(what, async {
        while !check().await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

fn messages(tag: &str, range: std::ops::Range<usize>) -> Vec<OutgoingMessage> {
    range
        .map(|i| OutgoingMessage::new(format!("{tag}-{i}")).with_header("n", i.to_string()))
        .collect()
}

fn body(message: &ReceivedMessage) -> String {
    String::from_utf8(message.body.clone()).expect("test bodies are UTF-8")
}

fn now_ms() -> i64 {
    let elapsed = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    i64::try_from(elapsed.as_millis()).unwrap()
}

/// Rows of the queue table, whatever their state.
async fn rows(pool: &SqlitePool, queue: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM broker_messages WHERE queue = ?1")
        .bind(queue)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Messages currently hidden by a claim.
async fn claimed(pool: &SqlitePool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM broker_messages WHERE visible_at > ?1")
        .bind(now_ms())
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Body and headers of every dead-lettered message.
async fn dead_letters(pool: &SqlitePool) -> Vec<(String, HashMap<String, String>)> {
    let found: Vec<(Vec<u8>, String)> = sqlx::query_as(
        "SELECT body, headers FROM broker_messages WHERE queue = 'dead-letter' ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    found
        .into_iter()
        .map(|(body, headers)| {
            (
                String::from_utf8(body).unwrap(),
                serde_json::from_str(&headers).unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_consume_ack_empties_the_queue() {
    let db = TestDb::new();
    let pool = db.pool().await;
    let broker = open(&pool).await;
    const N: usize = 50;
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    let batch = messages("m", 0..N)
        .into_iter()
        .map(|m| m.with_header("traceparent", traceparent))
        .collect();
    broker.publish(QueueName::Deliveries, batch).await.unwrap();
    broker
        .publish(QueueName::Deliveries, Vec::new())
        .await
        .unwrap();
    assert_eq!(
        broker.queue_depth(QueueName::Deliveries).await.unwrap(),
        N as u64
    );
    assert_eq!(broker.queue_depth(QueueName::Retries).await.unwrap(), 0);
    broker.ping().await.unwrap();

    let mut stream = broker.consume(QueueName::Deliveries, 10).await.unwrap();
    for i in 0..N {
        let message = next(&mut stream, "a delivery").await;
        assert!(!message.redelivered, "nothing was redelivered");
        assert_eq!(body(&message), format!("m-{i}"), "in publication order");
        assert_eq!(message.headers.get("n"), Some(&i.to_string()));
        assert_eq!(
            message.headers.get("traceparent").map(String::as_str),
            Some(traceparent)
        );
        assert!(!message.headers.contains_key("x-delivery-count"));
        message.ack().await.unwrap();
    }
    assert_eq!(broker.queue_depth(QueueName::Deliveries).await.unwrap(), 0);
    assert_eq!(rows(&pool, "deliveries").await, 0, "acks delete");
    broker.close().await;
    assert!(stream.next().await.is_none(), "streams end at shutdown");

    // Reopening finds nothing: every ack was committed.
    let broker = open(&pool).await;
    assert_eq!(broker.queue_depth(QueueName::Deliveries).await.unwrap(), 0);
    broker.close().await;
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_later_redelivers_the_message_marked_redelivered() {
    let db = TestDb::new();
    let pool = db.pool().await;
    let broker = open(&pool).await;

    broker
        .publish(
            QueueName::Retries,
            vec![OutgoingMessage::new("again").with_header("k", "v")],
        )
        .await
        .unwrap();
    let mut stream = broker.consume(QueueName::Retries, 1).await.unwrap();
    let first = next(&mut stream, "the message").await;
    assert!(!first.redelivered);
    first.retry_later().await.unwrap();

    let again = next(&mut stream, "the requeued message").await;
    assert_eq!(body(&again), "again");
    assert!(again.redelivered);
    assert_eq!(again.headers.get("k").map(String::as_str), Some("v"));
    assert_eq!(
        again.headers.get("x-delivery-count").map(String::as_str),
        Some("1"),
        "one earlier delivery"
    );
    again.ack().await.unwrap();
    assert_eq!(rows(&pool, "retries").await, 0);
    broker.close().await;
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_moves_the_message_to_the_dead_letter_queue() {
    let db = TestDb::new();
    let pool = db.pool().await;
    let broker = open(&pool).await;

    broker
        .publish(
            QueueName::Retries,
            vec![OutgoingMessage::new("poison").with_header("k", "v")],
        )
        .await
        .unwrap();
    let mut stream = broker.consume(QueueName::Retries, 1).await.unwrap();
    let message = next(&mut stream, "the message").await;
    message.dead_letter().await.unwrap();

    assert_eq!(broker.dead_letter_depth().await.unwrap(), 1);
    assert_eq!(broker.queue_depth(QueueName::Retries).await.unwrap(), 0);
    let dead = dead_letters(&pool).await;
    assert_eq!(dead.len(), 1);
    let (body, headers) = &dead[0];
    assert_eq!(body, "poison");
    assert_eq!(headers["k"], "v", "headers are kept");
    assert_eq!(headers["x-first-death-reason"], "rejected");
    assert_eq!(headers["x-first-death-queue"], "retries");
    assert_eq!(headers["x-last-death-reason"], "rejected");
    broker.close().await;
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_delivery_limit_is_dead_lettered() {
    let db = TestDb::new();
    let pool = db.pool().await;
    let cfg = EmbeddedConfig {
        delivery_limit: 2,
        ..EmbeddedConfig::default()
    };
    let broker = open_with(&pool, cfg).await;

    broker
        .publish(
            QueueName::Deliveries,
            vec![OutgoingMessage::new("crashes consumers").with_header("k", "v")],
        )
        .await
        .unwrap();
    let mut stream = broker.consume(QueueName::Deliveries, 1).await.unwrap();
    let first = next(&mut stream, "the first delivery").await;
    assert!(!first.redelivered);
    first.retry_later().await.unwrap();
    let second = next(&mut stream, "the second delivery").await;
    assert!(second.redelivered);
    second.retry_later().await.unwrap();

    // A third claim finds it over the limit: it goes to the dead-letter
    // queue and the consumer gets nothing.
    let third = tokio::spawn(async move { stream.next().await.map(|m| body(&m)) });
    eventually("the message in the dead-letter queue", || async {
        broker.dead_letter_depth().await.unwrap() == 1
    })
    .await;
    assert_eq!(broker.queue_depth(QueueName::Deliveries).await.unwrap(), 0);
    let dead = dead_letters(&pool).await;
    assert_eq!(dead[0].0, "crashes consumers");
    assert_eq!(dead[0].1["k"], "v");
    assert_eq!(dead[0].1["x-first-death-reason"], "delivery_limit");
    assert_eq!(dead[0].1["x-first-death-queue"], "deliveries");

    broker.close().await;
    assert_eq!(
        within("the stream to end", third).await.unwrap(),
        None,
        "no third delivery"
    );
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_bounds_unsettled_messages() {
    let db = TestDb::new();
    let pool = db.pool().await;
    let broker = open(&pool).await;
    const PREFETCH: usize = 5;

    broker
        .publish(QueueName::Deliveries, messages("p", 0..20))
        .await
        .unwrap();
    let mut stream = broker
        .consume(QueueName::Deliveries, PREFETCH as u16)
        .await
        .unwrap();
    let mut held = Vec::new();
    for _ in 0..PREFETCH {
        held.push(next(&mut stream, "a delivery within the prefetch").await);
    }
    assert_eq!(claimed(&pool).await, PREFETCH as i64);

    // With every credit used the stream claims nothing more, however long it
    // is polled (a bounded check of an absence).
    let more = tokio::time::timeout(Duration::from_millis(300), stream.next()).await;
    assert!(more.is_err(), "a sixth message arrived with prefetch 5");
    assert_eq!(claimed(&pool).await, PREFETCH as i64);
    assert_eq!(broker.queue_depth(QueueName::Deliveries).await.unwrap(), 15);

    // Settling one frees one credit.
    held.pop().unwrap().ack().await.unwrap();
    held.push(next(&mut stream, "a delivery after an ack").await);
    assert_eq!(claimed(&pool).await, PREFETCH as i64);

    for message in held {
        message.ack().await.unwrap();
    }
    broker.close().await;
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_an_unsettled_message_puts_it_back_at_once() {
    let db = TestDb::new();
    let pool = db.pool().await;
    let broker = open(&pool).await;

    broker
        .publish(QueueName::Deliveries, vec![OutgoingMessage::new("dropped")])
        .await
        .unwrap();
    let mut stream = broker.consume(QueueName::Deliveries, 1).await.unwrap();
    drop(next(&mut stream, "the message").await);
    // Well before the 5-minute visibility timeout.
    let again = next(&mut stream, "the dropped message again").await;
    assert_eq!(body(&again), "dropped");
    assert!(again.redelivered);
    again.ack().await.unwrap();
    broker.close().await;
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_claim_is_redelivered_and_its_stale_holder_cannot_settle() {
    let db = TestDb::new();
    let pool = db.pool().await;
    let broker = open(&pool).await;

    broker
        .publish(QueueName::Deliveries, vec![OutgoingMessage::new("slow")])
        .await
        .unwrap();
    let mut first = broker.consume(QueueName::Deliveries, 1).await.unwrap();
    let mut second = broker.consume(QueueName::Deliveries, 1).await.unwrap();
    let stale = next(&mut first, "the first delivery").await;

    // The second consumer waits; the claim runs out (as if its holder had
    // hung past the visibility timeout); the fallback poll finds it.
    let waiter = tokio::spawn(async move {
        let message = second.next().await;
        (message, second)
    });
    sqlx::query("UPDATE broker_messages SET visible_at = 0")
        .execute(&pool)
        .await
        .unwrap();
    let (current, _second) = within("the redelivery", waiter).await.unwrap();
    let current = current.expect("a redelivery");
    assert_eq!(body(&current), "slow");
    assert!(current.redelivered);

    assert!(
        matches!(stale.ack().await, Err(BrokerError::StaleDelivery)),
        "only the current holder may settle"
    );
    assert_eq!(rows(&pool, "deliveries").await, 1);
    current.ack().await.unwrap();
    assert_eq!(rows(&pool, "deliveries").await, 0);
    broker.close().await;
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_puts_unsettled_messages_back_and_refuses_work() {
    let db = TestDb::new();
    let pool = db.pool().await;
    let broker = open(&pool).await;

    broker
        .publish(QueueName::Deliveries, messages("c", 0..3))
        .await
        .unwrap();
    let mut stream = broker.consume(QueueName::Deliveries, 3).await.unwrap();
    let held = next(&mut stream, "a delivery").await;
    let mut changes = broker.changes().await.unwrap();
    broker.close().await;

    assert!(stream.next().await.is_none());
    assert!(changes.next().await.is_none());
    assert!(matches!(held.ack().await, Err(BrokerError::Closed)));
    assert!(matches!(
        broker
            .publish(QueueName::Deliveries, messages("x", 0..1))
            .await,
        Err(BrokerError::Closed)
    ));
    assert!(matches!(
        broker.consume(QueueName::Deliveries, 1).await,
        Err(BrokerError::Closed)
    ));
    assert!(matches!(
        broker.announce(b"x".to_vec()).await,
        Err(BrokerError::Closed)
    ));
    assert!(matches!(broker.ping().await, Err(BrokerError::Closed)));
    assert_eq!(claimed(&pool).await, 0, "close released every claim");
    assert_eq!(broker.queue_depth(QueueName::Deliveries).await.unwrap(), 3);
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_messages_survive_a_broker_that_vanished() {
    let db = TestDb::new();
    let pool = db.pool().await;
    let broker = open(&pool).await;
    const N: usize = 30;
    const ACKED: usize = 4;
    const HELD: usize = 6;

    broker
        .publish(QueueName::Deliveries, messages("v", 0..N))
        .await
        .unwrap();
    broker
        .publish(QueueName::Retries, messages("r", 0..5))
        .await
        .unwrap();
    let mut stream = broker
        .consume(QueueName::Deliveries, (ACKED + HELD) as u16)
        .await
        .unwrap();
    let mut acked = HashSet::new();
    let mut held = Vec::new();
    for i in 0..ACKED + HELD {
        let message = next(&mut stream, "a delivery").await;
        if i < ACKED {
            acked.insert(body(&message));
            message.ack().await.unwrap();
        } else {
            held.push(message);
        }
    }
    let held_bodies: HashSet<String> = held.iter().map(body).collect();

    // Gone without running any cleanup, as if the process had died: no
    // close, no drop handlers, nothing put back. (The SIGKILL test below does
    // it with a real process.)
    std::mem::forget(held);
    std::mem::forget(stream);
    std::mem::forget(broker);
    drop(pool);

    let pool = db.pool().await;
    let broker = open(&pool).await;
    assert_eq!(
        broker.queue_depth(QueueName::Deliveries).await.unwrap(),
        (N - ACKED) as u64,
        "every unacked message is visible again at once"
    );
    assert_eq!(broker.queue_depth(QueueName::Retries).await.unwrap(), 5);
    let mut stream = broker.consume(QueueName::Deliveries, 8).await.unwrap();
    let mut seen = HashSet::new();
    for _ in 0..N - ACKED {
        let message = next(&mut stream, "a delivery after the restart").await;
        let text = body(&message);
        assert!(!acked.contains(&text), "{text} was acked before the crash");
        assert_eq!(message.redelivered, held_bodies.contains(&text), "{text}");
        assert!(seen.insert(text), "no duplicate");
        message.ack().await.unwrap();
    }
    assert_eq!(rows(&pool, "deliveries").await, 0);
    broker.close().await;
    pool.close().await;
}

/// Set for the child process of the SIGKILL test: the database it works on.
const CHILD_ENV: &str = "HOOKLINE_EMBEDDED_CRASH_CHILD_DB";
/// The child's line saying it is ready to be killed, followed by the bodies
/// it acknowledged.
const CHILD_READY: &str = "crash-child-ready:";
const CRASH_N: usize = 100;
const CRASH_ACKED: usize = 10;
const CRASH_HELD: usize = 20;

/// Not a test of its own: the child process of
/// `sigkill_loses_nothing_acknowledged` (does nothing unless [`CHILD_ENV`] is
/// set). It publishes, acknowledges some messages, holds others unsettled,
/// says so on stdout and waits to be killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_child() {
    let Some(path) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let pool = pool_at(Path::new(&path)).await;
    let broker = open(&pool).await;
    broker
        .publish(QueueName::Deliveries, messages("k", 0..CRASH_N))
        .await
        .unwrap();
    broker
        .publish(QueueName::Retries, messages("r", 0..3))
        .await
        .unwrap();
    let mut stream = broker
        .consume(QueueName::Deliveries, (CRASH_ACKED + CRASH_HELD) as u16)
        .await
        .unwrap();
    let mut acked = Vec::new();
    let mut held = Vec::new();
    for i in 0..CRASH_ACKED + CRASH_HELD {
        let message = next(&mut stream, "a delivery").await;
        if i < CRASH_ACKED {
            acked.push(body(&message));
            message.ack().await.unwrap();
        } else {
            held.push(message);
        }
    }
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{CHILD_READY}{}", acked.join(",")).unwrap();
    stdout.flush().unwrap();
    drop(stdout);
    std::future::pending::<()>().await;
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_nothing_acknowledged() {
    use std::os::unix::process::ExitStatusExt as _;

    let db = TestDb::new();
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, &db.path)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the child test process");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let acked: HashSet<String> = within("the child to publish and settle", async {
        loop {
            let line = lines
                .next_line()
                .await
                .unwrap()
                .expect("the child exited before it was ready");
            // libtest may have printed "test crash_child ... " on the line.
            if let Some((_, bodies)) = line.split_once(CHILD_READY) {
                return bodies.split(',').map(str::to_owned).collect();
            }
        }
    })
    .await;
    assert_eq!(acked.len(), CRASH_ACKED);

    child.start_kill().unwrap();
    let status = within("the child to die", child.wait()).await.unwrap();
    assert_eq!(status.signal(), Some(9), "killed by SIGKILL: {status:?}");

    let pool = db.pool().await;
    let broker = open(&pool).await;
    assert_eq!(
        broker.queue_depth(QueueName::Deliveries).await.unwrap(),
        (CRASH_N - CRASH_ACKED) as u64
    );
    assert_eq!(broker.queue_depth(QueueName::Retries).await.unwrap(), 3);
    let mut stream = broker.consume(QueueName::Deliveries, 16).await.unwrap();
    let mut seen = HashSet::new();
    let mut redelivered = BTreeSet::new();
    for _ in 0..CRASH_N - CRASH_ACKED {
        let message = next(&mut stream, "a delivery after the crash").await;
        let text = body(&message);
        assert!(!acked.contains(&text), "{text} was acked before the crash");
        if message.redelivered {
            redelivered.insert(text.clone());
        }
        assert!(seen.insert(text), "no duplicate");
        message.ack().await.unwrap();
    }
    // The child took k-0.. in order, acked the first ones, held the next.
    let expected: BTreeSet<String> = (CRASH_ACKED..CRASH_ACKED + CRASH_HELD)
        .map(|i| format!("k-{i}"))
        .collect();
    assert_eq!(redelivered, expected, "the held messages came back");
    assert_eq!(rows(&pool, "deliveries").await, 0);
    broker.close().await;
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_fan_out_to_every_subscriber() {
    let db = TestDb::new();
    let pool = db.pool().await;
    let broker = open(&pool).await;

    // No subscriber: fine.
    broker.announce(b"nobody".to_vec()).await.unwrap();
    let mut a = broker.changes().await.unwrap();
    let mut b = broker.changes().await.unwrap();
    for change in ["one", "two", "three"] {
        broker.announce(change.as_bytes().to_vec()).await.unwrap();
    }
    for stream in [&mut a, &mut b] {
        for change in ["one", "two", "three"] {
            assert_eq!(
                next(stream, "a change").await,
                ChangeNotice::Change(change.as_bytes().to_vec()),
                "a fresh subscriber needs no resync, and sees changes in order"
            );
        }
    }

    // A late subscriber sees what comes after it subscribed.
    let mut late = broker.changes().await.unwrap();
    broker.announce(b"four".to_vec()).await.unwrap();
    assert_eq!(
        next(&mut late, "a change").await,
        ChangeNotice::Change(b"four".to_vec())
    );
    broker.close().await;
    assert!(a.next().await.is_none(), "streams end at shutdown");

    // A subscriber that falls behind is told to resync.
    let cfg = EmbeddedConfig {
        changes_capacity: 2,
        ..EmbeddedConfig::default()
    };
    let broker = open_with(&pool, cfg).await;
    let mut slow = broker.changes().await.unwrap();
    for i in 0..5 {
        broker.announce(format!("c{i}").into_bytes()).await.unwrap();
    }
    assert_eq!(next(&mut slow, "a resync").await, ChangeNotice::Resync);
    assert_eq!(
        next(&mut slow, "a change").await,
        ChangeNotice::Change(b"c3".to_vec())
    );
    assert_eq!(
        next(&mut slow, "a change").await,
        ChangeNotice::Change(b"c4".to_vec())
    );
    broker.close().await;
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_and_consumers_lose_nothing_and_duplicate_nothing() {
    let db = TestDb::new();
    let pool = db.pool().await;
    let broker = Arc::new(open(&pool).await);
    const PUBLISHERS: usize = 4;
    const BATCHES: usize = 50;
    const BATCH: usize = 100;
    const CONSUMERS: usize = 2;
    const N: usize = PUBLISHERS * BATCHES * BATCH;

    let stop = CancellationToken::new();
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<(usize, String, bool)>();
    let mut consumers = JoinSet::new();
    for consumer in 0..CONSUMERS {
        let mut stream = broker.consume(QueueName::Deliveries, 128).await.unwrap();
        let stop = stop.clone();
        let seen_tx = seen_tx.clone();
        consumers.spawn(async move {
            // Acks run concurrently, as a dispatcher's would.
            let mut acks: JoinSet<Result<(), BrokerError>> = JoinSet::new();
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    Some(acked) = acks.join_next(), if !acks.is_empty() => {
                        acked.unwrap().unwrap();
                    }
                    message = stream.next() => {
                        let message: ReceivedMessage = message.expect("streams end only at shutdown");
                        seen_tx.send((consumer, body(&message), message.redelivered)).unwrap();
                        acks.spawn(message.ack());
                    }
                }
            }
            while let Some(acked) = acks.join_next().await {
                acked.unwrap().unwrap();
            }
        });
    }

    let started = Instant::now();
    let mut publishers = JoinSet::new();
    for publisher in 0..PUBLISHERS {
        let broker = broker.clone();
        publishers.spawn(async move {
            for batch in 0..BATCHES {
                let first = (publisher * BATCHES + batch) * BATCH;
                broker
                    .publish(QueueName::Deliveries, messages("c", first..first + BATCH))
                    .await
                    .unwrap();
            }
        });
    }
    within("the publishers", async {
        while let Some(done) = publishers.join_next().await {
            done.unwrap();
        }
    })
    .await;
    let published = started.elapsed();

    let mut seen = HashSet::new();
    let mut per_consumer = [0usize; CONSUMERS];
    within("every message", async {
        while seen.len() < N {
            let (consumer, text, redelivered) = seen_rx.recv().await.unwrap();
            assert!(!redelivered, "{text} redelivered");
            assert!(seen.insert(text.clone()), "{text} delivered twice");
            per_consumer[consumer] += 1;
        }
    })
    .await;
    stop.cancel();
    within("the consumers' acks", async {
        while let Some(done) = consumers.join_next().await {
            done.unwrap();
        }
    })
    .await;
    let finished = started.elapsed();

    assert!(
        per_consumer.iter().all(|&count| count > 0),
        "both consumers took part: {per_consumer:?}"
    );
    assert_eq!(rows(&pool, "deliveries").await, 0, "every ack committed");
    assert!(seen_rx.try_recv().is_err(), "nothing beyond the N messages");
    println!(
        "embedded queue: {N} messages published by {PUBLISHERS} tasks in batches of {BATCH} in {published:?} \
         ({:.0}/s); published, consumed by {CONSUMERS} consumers and acked in {finished:?} ({:.0}/s); split {per_consumer:?}",
        N as f64 / published.as_secs_f64(),
        N as f64 / finished.as_secs_f64(),
    );
    Arc::into_inner(broker)
        .expect("the last handle")
        .close()
        .await;
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shares_the_database_with_a_busy_store() {
    let db = TestDb::new();
    let pool = db.pool().await;
    sqlx::query("CREATE TABLE store_rows (id INTEGER PRIMARY KEY, payload TEXT NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    let broker = Arc::new(open(&pool).await);
    const BATCHES: usize = 20;
    const BATCH: usize = 100;
    const STORE_TRANSACTIONS: usize = 300;

    // The store writes on the same pool meanwhile: transactions of two
    // statements, each holding SQLite's one write lock.
    let store = {
        let pool = pool.clone();
        tokio::spawn(async move {
            for i in 0..STORE_TRANSACTIONS {
                let mut tx = pool.begin_with("BEGIN IMMEDIATE").await.unwrap();
                for half in ["a", "b"] {
                    sqlx::query("INSERT INTO store_rows (payload) VALUES (?1)")
                        .bind(format!("{i}{half}"))
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                }
                tx.commit().await.unwrap();
            }
        })
    };
    let publisher = {
        let broker = broker.clone();
        tokio::spawn(async move {
            for batch in 0..BATCHES {
                let first = batch * BATCH;
                broker
                    .publish(QueueName::Deliveries, messages("s", first..first + BATCH))
                    .await
                    .unwrap();
            }
        })
    };
    let mut stream = broker.consume(QueueName::Deliveries, 32).await.unwrap();
    let mut seen = HashSet::new();
    while seen.len() < BATCHES * BATCH {
        let message = next(&mut stream, "a delivery").await;
        assert!(seen.insert(body(&message)), "no duplicate");
        message.ack().await.unwrap();
    }
    within("the store", store).await.unwrap();
    within("the publisher", publisher).await.unwrap();
    assert_eq!(rows(&pool, "deliveries").await, 0);
    let store_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM store_rows")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(store_rows, 2 * STORE_TRANSACTIONS as i64);
    drop(stream);
    Arc::into_inner(broker)
        .expect("the last handle")
        .close()
        .await;
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_is_idempotent_and_refuses_what_it_cannot_work_with() {
    let db = TestDb::new();
    let pool = db.pool().await;
    // The store's tables live in the same database.
    sqlx::query("CREATE TABLE events (id TEXT PRIMARY KEY)")
        .execute(&pool)
        .await
        .unwrap();

    let broker = open(&pool).await;
    broker
        .publish(QueueName::Deliveries, messages("o", 0..2))
        .await
        .unwrap();
    broker.close().await;
    let broker = open(&pool).await;
    assert_eq!(broker.queue_depth(QueueName::Deliveries).await.unwrap(), 2);
    broker.close().await;

    let bad = EmbeddedConfig {
        delivery_limit: 0,
        ..EmbeddedConfig::default()
    };
    assert!(matches!(
        EmbeddedBroker::open(pool.clone(), bad).await,
        Err(BrokerError::InvalidConfig(_))
    ));

    sqlx::query("UPDATE broker_meta SET value = 99 WHERE key = 'schema_version'")
        .execute(&pool)
        .await
        .unwrap();
    let error = EmbeddedBroker::open(pool.clone(), EmbeddedConfig::default())
        .await
        .unwrap_err();
    assert!(error.to_string().contains("newer"), "{error}");
    pool.close().await;
}
