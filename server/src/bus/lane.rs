//! The way out to one Redis: publishes leave in the order they were handed over.
//!
//! A replica's messages must reach every Redis in the order it published them: each Redis
//! stamps them with its own sequence, keeps them in that order for resumes and sends them on
//! in that order. Commands started concurrently on a multiplexed connection are not written in
//! the order they were started (a reconnect wakes its waiters in no set order, a script that
//! Redis forgot costs two more round trips), so a publish answered by one Redis, and the next
//! one sent after that answer, could swap places on another Redis. A lane takes publishes in
//! order and sends them as pipelines, one pipeline at a time: what queued up while one was out
//! leaves together in the next, in order.
//!
//! Memory: what waits in a lane is bounded in bytes (`BUS_BACKLOG_BYTES`); past it a publish
//! is refused on this Redis (`Busy`) and counts as missed there, like one sent while it is down.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use redis::{Cmd, RedisResult, Script, ServerErrorKind, Value, aio::ConnectionManager};
use tokio::sync::{mpsc, oneshot};

use super::link::{BusError, bounded};

/// What a lane sends: shared by every link's lane, encoded by each.
pub enum Outgoing {
    /// `PUBLISH`, answered with the number of subscribers that received it.
    Publish { chan: Arc<str>, payload: Arc<[u8]> },
    /// `EVALSHA` of a script (`script` is `code`'s), sent whole (`EVAL`) when Redis has
    /// forgotten it.
    Script {
        script: &'static Script,
        code: &'static str,
        keys: Arc<[String]>,
        args: Arc<[String]>,
    },
}

impl Outgoing {
    /// The command; `whole` sends a script's code rather than its hash.
    fn command(&self, whole: bool) -> Cmd {
        match self {
            Outgoing::Publish { chan, payload } => {
                let mut cmd = redis::cmd("PUBLISH");
                cmd.arg(&**chan).arg(&**payload);
                cmd
            }
            Outgoing::Script {
                script,
                code,
                keys,
                args,
            } => {
                let mut cmd = redis::cmd(if whole { "EVAL" } else { "EVALSHA" });
                if whole {
                    cmd.arg(*code);
                } else {
                    cmd.arg(script.get_hash());
                }
                cmd.arg(keys.len()).arg(&**keys).arg(&**args);
                cmd
            }
        }
    }

    /// Bytes it holds while it waits (its own data and a little bookkeeping).
    fn weight(&self) -> usize {
        let data = match self {
            Outgoing::Publish { chan, payload } => chan.len() + payload.len(),
            Outgoing::Script { keys, args, .. } => {
                keys.iter().chain(args.iter()).map(String::len).sum()
            }
        };
        data + std::mem::size_of::<Job>()
    }
}

/// What the lane needs of its link.
pub trait Host: Send + Sync + 'static {
    fn is_up(&self) -> bool;
    /// The link itself failed (not a command that Redis refused).
    fn link_failed(&self);
    /// A command failed; `missed` when it was a message meant for every link.
    fn command_failed(&self, missed: bool);
}

/// The answer to one command, once its pipeline is back.
pub type Reply = oneshot::Receiver<Result<Value, BusError>>;

struct Job {
    out: Arc<Outgoing>,
    weight: usize,
    missed: bool,
    reply: oneshot::Sender<Result<Value, BusError>>,
}

/// At most this many commands, or about this many bytes, leave in one pipeline.
const MAX_JOBS: usize = 512;
const MAX_BYTES: usize = 1 << 20;

/// The sending end; the lane's task ends with the last clone.
#[derive(Clone)]
pub struct Lane {
    tx: mpsc::UnboundedSender<Job>,
    bytes: Arc<AtomicUsize>,
    limit: Arc<AtomicUsize>,
}

impl Lane {
    /// Starts the lane's task on `conn`. Needs a tokio runtime.
    pub fn start(conn: ConnectionManager, host: Arc<dyn Host>, limit: usize) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let bytes = Arc::new(AtomicUsize::new(0));
        tokio::spawn(run(conn, host, rx, bytes.clone()));
        Self {
            tx,
            bytes,
            limit: Arc::new(AtomicUsize::new(limit)),
        }
    }

    pub fn set_limit(&self, bytes: usize) {
        self.limit.store(bytes, Ordering::Relaxed);
    }

    /// Queues `out` behind everything queued before it. `missed` says how a failure counts (see
    /// [`Host::command_failed`]); the caller counts a refusal here itself.
    pub fn send(&self, out: &Arc<Outgoing>, missed: bool) -> Result<Reply, BusError> {
        let weight = out.weight();
        let limit = self.limit.load(Ordering::Relaxed);
        // One publish larger than the bound passes alone, as in the queue from Redis.
        self.bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n == 0 || n + weight <= limit).then_some(n + weight)
            })
            .map_err(BusError::Busy)?;
        let (reply, answer) = oneshot::channel();
        let job = Job {
            out: out.clone(),
            weight,
            missed,
            reply,
        };
        if self.tx.send(job).is_err() {
            self.bytes.fetch_sub(weight, Ordering::AcqRel);
            return Err(BusError::Unavailable);
        }
        Ok(answer)
    }
}

async fn run(
    mut conn: ConnectionManager,
    host: Arc<dyn Host>,
    mut rx: mpsc::UnboundedReceiver<Job>,
    bytes: Arc<AtomicUsize>,
) {
    let mut batch: Vec<Job> = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut size = first.weight;
        batch.push(first);
        while batch.len() < MAX_JOBS && size < MAX_BYTES {
            let Ok(job) = rx.try_recv() else { break };
            size += job.weight;
            batch.push(job);
        }
        // A link found down since these were queued: they fail at once, as they would have
        // been refused a moment later.
        let results = if host.is_up() {
            send_batch(&mut conn, &batch).await
        } else {
            vec![Err(BusError::Unavailable); batch.len()]
        };
        bytes.fetch_sub(size, Ordering::AcqRel);
        if results
            .iter()
            .any(|r| r.as_ref().is_err_and(BusError::is_link_failure))
        {
            host.link_failed();
        }
        for (job, result) in batch.drain(..).zip(results) {
            if result.is_err() {
                host.command_failed(job.missed);
            }
            // The caller may have stopped waiting (another Redis answered first).
            let _ = job.reply.send(result);
        }
    }
}

/// Sends `batch` as one pipeline and answers each command; commands whose script Redis had
/// forgotten (a restart, `SCRIPT FLUSH`) are sent again, in their order, with the script's
/// code, which cannot be refused so (loading it first could be undone before the second try).
async fn send_batch(conn: &mut ConnectionManager, batch: &[Job]) -> Vec<Result<Value, BusError>> {
    let mut results = pipeline(conn, batch.iter(), false).await;
    let forgotten: Vec<usize> = (0..batch.len())
        .filter(|&i| matches!(&results[i], Err(BusError::Redis(e)) if e.kind() == redis::ErrorKind::Server(ServerErrorKind::NoScript)))
        .collect();
    if forgotten.is_empty() {
        return results;
    }
    let again = pipeline(conn, forgotten.iter().map(|&i| &batch[i]), true).await;
    for (i, result) in forgotten.into_iter().zip(again) {
        results[i] = result;
    }
    results
}

async fn pipeline<'a>(
    conn: &mut ConnectionManager,
    jobs: impl ExactSizeIterator<Item = &'a Job>,
    whole: bool,
) -> Vec<Result<Value, BusError>> {
    let n = jobs.len();
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for job in jobs {
        pipe.add_command(job.out.command(whole));
    }
    match bounded(pipe.query_async::<Vec<RedisResult<Value>>>(conn)).await {
        Ok(replies) if replies.len() == n => replies
            .into_iter()
            .map(|r| r.map_err(BusError::Redis))
            .collect(),
        Ok(replies) => {
            let e = BusError::Redis(redis::RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "a pipeline answered a different number of commands",
                format!("{} for {n}", replies.len()),
            )));
            vec![Err(e); n]
        }
        Err(e) => vec![Err(e); n],
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;

    use super::*;

    /// A link that is down: the lane answers every command `Unavailable` without Redis.
    #[derive(Default)]
    struct Down {
        missed: AtomicU64,
    }

    impl Host for Down {
        fn is_up(&self) -> bool {
            false
        }
        fn link_failed(&self) {}
        fn command_failed(&self, missed: bool) {
            if missed {
                self.missed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn publish(bytes: usize) -> Arc<Outgoing> {
        Arc::new(Outgoing::Publish {
            chan: "c".into(),
            payload: vec![b'x'; bytes].into(),
        })
    }

    // One thread: the lane's task runs only while the test awaits.
    #[tokio::test(flavor = "current_thread")]
    async fn what_waits_in_a_lane_is_bounded_in_bytes() {
        let client = redis::Client::open("redis://127.0.0.1:1").expect("a client");
        let conn = ConnectionManager::new_lazy_with_config(client, Default::default())
            .expect("a lazy connection");
        let host = Arc::new(Down::default());
        let one = publish(1000);
        let lane = Lane::start(conn, host.clone(), 3 * one.weight());
        let replies: Vec<Reply> = (0..3)
            .map(|_| lane.send(&one, true).expect("room for three"))
            .collect();
        assert!(matches!(lane.send(&one, true), Err(BusError::Busy(n)) if n == 3 * one.weight()));
        for reply in replies {
            assert!(matches!(reply.await, Ok(Err(BusError::Unavailable))));
        }
        assert_eq!(host.missed.load(Ordering::Relaxed), 3);
        // Answered: the room is back, and one publish larger than the bound passes alone.
        let big = publish(10_000);
        let reply = lane.send(&big, false).expect("alone, it passes");
        assert!(matches!(lane.send(&one, true), Err(BusError::Busy(_))));
        assert!(matches!(reply.await, Ok(Err(BusError::Unavailable))));
        assert_eq!(
            host.missed.load(Ordering::Relaxed),
            3,
            "a plain publish is no miss"
        );
    }
}
