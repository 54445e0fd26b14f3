//! The driver's gRPC services: plugin-watcher registration, DRAPlugin (v1
//! and v1beta1, one implementation) and DRAResourceHealth (v1alpha1).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use devplug_proto::dra::{v1, v1beta1};
use devplug_proto::drahealth::v1alpha1 as health;
use devplug_proto::pluginregistration as reg;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::resource::v1::ResourceClaim;
use kube::api::Api;
use tokio::sync::{Mutex, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use super::claims::{self, Checkpoint, PreparedClaim};
use super::names::{self, Paths};
use crate::cdi;
use crate::devices::device::{Made, Partition};
use crate::devices::health::Health;
use crate::devices::sources::Partitioner;
use crate::plugin::PluginState;

/// How often the full health list is sent again without a change, so the
/// kubelet never takes a quiet driver for a silent one.
pub const HEALTH_HEARTBEAT: Duration = Duration::from_secs(10);
/// What the kubelet is told to wait for news of a device before it
/// assumes Unknown (several heartbeats).
pub const HEALTH_TIMEOUT_SECONDS: i64 = 60;
/// Longest wait for the API server when reading a claim.
const CLAIM_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Most claim and pod reads in flight at once (see [`DraState::reads`]):
/// streams of one HTTP/2 connection (`crate::http2`). Measured with the
/// DRA bench: 100 prepares at once met the p99 target in 6 of 7 runs with
/// 32, in 1 of 4 with 8.
pub const READS_AT_ONCE: usize = 32;
/// At most this many CDI specs of one call are written on the async
/// worker itself, and only on a tmpfs (see [`DraState::prepare`]).
const SPECS_IN_PLACE: usize = 4;

/// Crash-consistency tests: `DEVPLUG_FAILPOINT=<name>` kills the process
/// at that point, as a crash or `kill -9` would. Unset in production.
fn failpoint(name: &str) {
    if std::env::var_os("DEVPLUG_FAILPOINT").is_some_and(|v| v == name) {
        std::process::abort();
    }
}

/// The API server's own words for an error, without a debug dump.
pub fn api_message(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{} (HTTP {})", s.message, s.code),
        other => other.to_string(),
    }
}

/// Shared state of one DRA driver.
pub struct DraState {
    /// The plugin's config, snapshots, registration flags and metrics.
    pub plugin: Arc<PluginState>,
    /// This node (the pool name).
    pub node: String,
    /// Sockets and checkpoint.
    pub paths: Paths,
    /// Where claim CDI specs go.
    pub cdi_dir: PathBuf,
    /// API access (cluster mode): claims are read from the API server.
    pub client: Option<kube::Client>,
    /// What claims and pods are read with in prepare (HTTP/2, so a hundred
    /// reads at once share one connection); `None` reads with `client`.
    pub reader: Option<kube::Client>,
    /// Prepared claims. Held only to read or record an entry, never across
    /// the ResourceClaim read, so one slow read stalls no other claim.
    pub checkpoint: Mutex<Checkpoint>,
    /// The checkpoint's `changes` on disk; held while saving, so saves
    /// are one at a time and each covers every change made before it
    /// (a group commit: a hundred prepares at once need a few writes, not
    /// a hundred fsyncs one after the other).
    pub saved: Mutex<u64>,
    /// The last save failed: new claims are refused until one succeeds
    /// (prepare saves nothing before it answers, so it asks first).
    pub save_failing: std::sync::atomic::AtomicBool,
    /// Asks [`DraState::flush_until`] to save the checkpoint.
    pub flush: tokio::sync::Notify,
    /// Told on every prepare and unprepare: the claims' device status
    /// ([`super::claim_status`]) follows.
    pub claims_changed: tokio::sync::Notify,
    /// Claim and pod reads at once: a hundred pods starting together are
    /// read over a few connections to the API server, not a hundred new
    /// TLS connections (the client speaks HTTP/1.1, one request each).
    pub reads: tokio::sync::Semaphore,
    /// One lock per claim UID being prepared or unprepared: the kubelet's
    /// calls for one claim are handled one at a time, different claims at
    /// once.
    pub claim_locks: ClaimLocks,
    /// Makes and removes the partitions the source publishes (NVIDIA
    /// `migPartitions`); `None` for sources without any.
    pub partitioner: Option<Arc<dyn Partitioner>>,
}

/// Per-claim locks, dropped again when nobody holds them.
#[derive(Default)]
pub struct ClaimLocks(std::sync::Mutex<BTreeMap<String, Arc<Mutex<()>>>>);

impl ClaimLocks {
    fn of(&self, uid: &str) -> Arc<Mutex<()>> {
        let mut m = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        m.entry(uid.to_string()).or_default().clone()
    }

    /// Forgets `uid`'s lock unless someone else still holds or waits on it.
    fn release(&self, uid: &str, lock: Arc<Mutex<()>>) {
        let mut m = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // The map's own reference and `lock`: nobody else.
        if Arc::strong_count(&lock) == 2 {
            m.remove(uid);
        }
    }

    /// How many claims have a lock now (for tests).
    pub fn len(&self) -> usize {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    /// Whether no claim has a lock now.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn devices_of(p: &PreparedClaim) -> Vec<v1::Device> {
    p.devices
        .iter()
        .map(|d| v1::Device {
            request_names: vec![d.result.request.clone()],
            pool_name: d.result.pool.clone(),
            device_name: d.result.device.clone(),
            cdi_device_ids: d.cdi_ids.clone(),
        })
        .collect()
}

impl DraState {
    async fn fetch(&self, c: &v1::Claim) -> Result<ResourceClaim, String> {
        let Some(client) = self.reader.as_ref().or(self.client.as_ref()) else {
            return Err(
                "this agent has no API access (standalone mode) and cannot read ResourceClaims"
                    .into(),
            );
        };
        let api: Api<ResourceClaim> = Api::namespaced(client.clone(), &c.namespace);
        let _turn = self
            .reads
            .acquire()
            .await
            .map_err(|_| "the agent is shutting down".to_string())?;
        let got = tokio::time::timeout(CLAIM_READ_TIMEOUT, api.get(&c.name))
            .await
            .map_err(|_| format!("reading ResourceClaim {}/{} timed out", c.namespace, c.name))?
            .map_err(|e| {
                format!(
                    "cannot read ResourceClaim {}/{}: {}",
                    c.namespace,
                    c.name,
                    api_message(&e)
                )
            })?;
        if got.metadata.uid.as_deref() != Some(c.uid.as_str()) {
            return Err(format!(
                "ResourceClaim {}/{} has UID {}, not {} (replaced meanwhile)",
                c.namespace,
                c.name,
                got.metadata.uid.as_deref().unwrap_or("none"),
                c.uid
            ));
        }
        Ok(got)
    }

    /// Prepares one claim (idempotent), serialised with every other call
    /// for the same claim.
    pub async fn prepare_one(&self, c: &v1::Claim) -> Result<Vec<v1::Device>, String> {
        self.prepare(vec![c.clone()])
            .await
            .claims
            .remove(&c.uid)
            .map(|r| {
                if r.error.is_empty() {
                    Ok(r.devices)
                } else {
                    Err(r.error)
                }
            })
            .unwrap_or_else(|| Err("no answer for the claim".into()))
    }

    /// The answer for a claim prepared before (the kubelet repeats calls
    /// after restarts), writing its CDI spec again if it is gone (a tmpfs
    /// after a reboot).
    fn answer_known(
        &self,
        c: &v1::Claim,
        p: &PreparedClaim,
        cfg: &crate::config::PluginConfig,
        snap: &crate::devices::inventory::Snapshot,
    ) -> Result<Vec<v1::Device>, String> {
        if let Some(f) = &p.cdi_file
            && !self.cdi_dir.join(f).exists()
        {
            let results: Vec<_> = p.devices.iter().map(|d| d.result.clone()).collect();
            let (_, spec) = claims::plan(
                &c.uid,
                &p.namespace,
                &p.name,
                &results,
                &claims::Others {
                    before: p.before.clone(),
                    after: p.after.clone(),
                },
                &self.node,
                cfg,
                snap,
                &p.partitions,
            )?;
            if let Some(b) = spec {
                cdi::write_atomic(&self.cdi_dir, f, &b)
                    .map_err(|e| format!("cannot write the CDI spec {f}: {e}"))?;
            }
        }
        debug!(policy = %cfg.name, claim = %c.uid, "claim already prepared");
        Ok(devices_of(p))
    }

    /// Prepares the claims of one call (the kubelet sends the claims of one
    /// pod together), each answered on its own: one bad claim never fails
    /// the others. Every claim of the call is locked (in UID order, so two
    /// calls sharing claims cannot deadlock) and read at once; the reads
    /// happen outside the checkpoint lock, so a slow read stalls no other
    /// call.
    ///
    /// What is on disk when the kubelet is answered: the claim's CDI spec
    /// (and, if partitions were made, a begun record holding them). The
    /// whole record (devices) is saved right after, by
    /// [`DraState::flush_until`]; a kill before that leaves the spec alone,
    /// which the next start records as begun ([`claims::adopt`]), and a
    /// repeated prepare reads the claim again. Saving a begun record before
    /// the read cost each new claim about 0.2 ms at p50 here (two fsyncs
    /// beside the read), for an owner the spec file already is.
    pub async fn prepare(&self, claims: Vec<v1::Claim>) -> v1::NodePrepareResourcesResponse {
        let start = std::time::Instant::now();
        let cfg = self.plugin.cfg();
        let snap = self.plugin.snapshots.borrow().clone();
        let mut answers: BTreeMap<String, Result<Vec<v1::Device>, String>> = BTreeMap::new();
        let mut uids: Vec<&str> = Vec::new();
        for c in &claims {
            if c.uid.is_empty() || c.name.is_empty() || c.namespace.is_empty() {
                answers.insert(
                    c.uid.clone(),
                    Err("a claim needs namespace, uid and name".into()),
                );
            } else if !uids.contains(&c.uid.as_str()) {
                uids.push(&c.uid);
            }
        }
        uids.sort_unstable();
        let locks: Vec<_> = uids.iter().map(|u| self.claim_locks.of(u)).collect();
        let mut guards = Vec::with_capacity(locks.len());
        for l in &locks {
            guards.push(l.lock().await);
        }
        let todo: Vec<&v1::Claim> = claims
            .iter()
            .filter(|c| uids.contains(&c.uid.as_str()))
            .collect();
        // Prepared before: answered from the record. Begun before and never
        // recorded whole: read again, like a new claim.
        let (known, begun_before): (BTreeMap<String, PreparedClaim>, Vec<String>) = {
            let cp = self.checkpoint.lock().await;
            let known = todo
                .iter()
                .filter_map(|c| cp.claims.get(&c.uid).map(|p| (c.uid.clone(), p.clone())))
                .filter(|(_, p)| !p.pending)
                .collect();
            let begun = todo
                .iter()
                .filter(|c| cp.claims.get(&c.uid).is_some_and(|p| p.pending))
                .map(|c| c.uid.clone())
                .collect();
            (known, begun)
        };
        let mut fresh: Vec<&v1::Claim> = Vec::new();
        for c in &todo {
            match known.get(&c.uid) {
                Some(p) => {
                    answers.insert(c.uid.clone(), self.answer_known(c, p, &cfg, &snap));
                }
                None if !fresh.iter().any(|f| f.uid == c.uid) => fresh.push(c),
                None => {}
            }
        }
        if !fresh.is_empty() {
            self.prepare_fresh(&fresh, &begun_before, &cfg, &snap, &mut answers)
                .await;
        }
        drop(guards);
        for (u, l) in uids.iter().zip(locks) {
            self.claim_locks.release(u, l);
        }
        let mut out = v1::NodePrepareResourcesResponse::default();
        for c in claims {
            let result = answers
                .get(&c.uid)
                .cloned()
                .unwrap_or_else(|| Err("no answer for the claim".into()));
            let r = match result {
                Ok(devices) => v1::NodePrepareResourceResponse {
                    devices,
                    error: String::new(),
                },
                Err(error) => {
                    warn!(claim = %format!("{}/{}", c.namespace, c.name), %error, "cannot prepare a claim");
                    v1::NodePrepareResourceResponse {
                        devices: Vec::new(),
                        error,
                    }
                }
            };
            self.plugin.metrics.dra_call(
                "prepare",
                &cfg.resource_name,
                r.error.is_empty(),
                start.elapsed(),
            );
            out.claims.insert(c.uid, r);
        }
        out
    }

    /// Prepares claims with no whole record (their locks held): reads
    /// them, writes their CDI specs, records them whole in memory and asks
    /// for a save. Nothing is saved before the answer unless partitions
    /// were made: a claim's spec file owns it on disk until the save (a
    /// kill in between leaves a spec no record owns, which the next start
    /// takes back as a begun record: [`claims::adopt`]).
    async fn prepare_fresh(
        &self,
        fresh: &[&v1::Claim],
        begun_before: &[String],
        cfg: &crate::config::PluginConfig,
        snap: &crate::devices::inventory::Snapshot,
        answers: &mut BTreeMap<String, Result<Vec<v1::Device>, String>>,
    ) {
        // What this call begins: the claims with no record from before. Only
        // they are undone on failure (a begun record from before may own a
        // spec a running container was started with).
        let added: Vec<&str> = fresh
            .iter()
            .filter(|c| !begun_before.contains(&c.uid))
            .map(|c| c.uid.as_str())
            .collect();
        // The whole records are saved after the answer; while saves fail,
        // a claim would be served that no record on disk holds (its
        // unprepare could then never be saved either), so new claims are
        // refused until a save goes through.
        if self.save_failing.load(Ordering::Relaxed) {
            let upto = self.checkpoint.lock().await.changes;
            if let Err(e) = self.persist(upto).await {
                for c in fresh {
                    answers.insert(
                        c.uid.clone(),
                        Err(format!(
                            "cannot record claims in {}: {e}",
                            self.paths.checkpoint.display()
                        )),
                    );
                }
                return;
            }
        }
        let began = std::time::Instant::now();
        let read = futures::future::join_all(fresh.iter().map(|c| self.fetch(c))).await;
        let read_took = began.elapsed();
        let mut undo: Vec<&str> = Vec::new();
        failpoint("prepare-after-read");
        let mut got: Vec<(&v1::Claim, ResourceClaim, Vec<claims::AllocResult>)> = Vec::new();
        for (c, r) in fresh.iter().zip(read) {
            match r.and_then(|v| claims::results_of(&v, &cfg.driver).map(|res| (v, res))) {
                Ok((v, res)) => got.push((c, v, res)),
                Err(e) => {
                    answers.insert(c.uid.clone(), Err(e));
                    undo.push(&c.uid);
                }
            }
        }
        let around = if got.len() >= 2 {
            self.claims_around(&got, snap).await
        } else {
            BTreeMap::new()
        };
        let made = self.make_partitions(&got, snap, answers, &mut undo).await;
        got.retain(|(c, _, _)| !answers.contains_key(&c.uid));
        let write_began = std::time::Instant::now();
        let mut staged = Vec::new();
        for (c, _, results) in &got {
            let alone = claims::Others::default();
            let others = around.get(&c.uid).unwrap_or(&alone);
            match claims::plan(
                &c.uid,
                &c.namespace,
                &c.name,
                results,
                others,
                &self.node,
                cfg,
                snap,
                made.get(&c.uid).map_or(&[][..], Vec::as_slice),
            ) {
                Ok((prepared, spec)) => {
                    let write = prepared.cdi_file.clone().zip(spec);
                    staged.push((*c, prepared, write));
                }
                Err(e) => {
                    answers.insert(c.uid.clone(), Err(e));
                    undo.push(&c.uid);
                }
            }
        }
        // The call's CDI specs are written off the async workers, in one
        // blocking task: each is two fsyncs, and a hundred pods starting at
        // once would otherwise hold the runtime's few worker threads
        // through them one after the other (and every other call's answer
        // with them). Calls write in parallel; the file system commits
        // concurrent fsyncs together. On a tmpfs (the runtime's
        // `/var/run/cdi` as a rule) the fsyncs return at once and the hop to
        // a blocking thread was most of the write (p50 156 µs against 87 µs
        // written in place, here), so a few specs are written in place.
        let mut writes: Vec<(String, Vec<u8>)> = Vec::new();
        let staged: Vec<_> = staged
            .into_iter()
            .map(|(c, prepared, w)| {
                let has = w.is_some();
                writes.extend(w);
                (c, prepared, has)
            })
            .collect();
        let count = writes.len();
        let dir = self.cdi_dir.clone();
        let write_all = move || {
            writes
                .iter()
                .map(|(f, bytes)| {
                    cdi::write_atomic(&dir, f, bytes)
                        .map_err(|e| format!("cannot write the CDI spec {f}: {e}"))?;
                    failpoint("prepare-after-cdi-spec");
                    Ok(())
                })
                .collect::<Vec<Result<(), String>>>()
        };
        let in_place = count <= SPECS_IN_PLACE && cdi::on_tmpfs(&self.cdi_dir);
        let mut written = if in_place {
            write_all()
        } else {
            tokio::task::spawn_blocking(write_all)
                .await
                .unwrap_or_else(|e| vec![Err(format!("writing the CDI specs: {e}")); count])
        }
        .into_iter();
        let mut planned = Vec::new();
        for (c, prepared, has_spec) in staged {
            let r = if has_spec {
                written
                    .next()
                    .unwrap_or_else(|| Err("no answer from the CDI spec writer".into()))
            } else {
                Ok(())
            };
            match r {
                Ok(()) => planned.push((c, prepared)),
                Err(e) => {
                    answers.insert(c.uid.clone(), Err(e));
                    undo.push(&c.uid);
                }
            }
        }
        let spec_took = write_began.elapsed();
        // Only what this call began is undone (see `added`).
        undo.retain(|u| added.contains(u));
        let unmade: Vec<Made> = undo
            .iter()
            .filter_map(|u| made.get(*u))
            .flatten()
            .cloned()
            .collect();
        // Already said in the log; the claims' answers say why they failed.
        let _ = self.destroy_partitions(unmade).await;
        if planned.is_empty() && undo.is_empty() {
            return;
        }
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        for (_, p) in &mut planned {
            p.prepared_at = Some(now.clone());
        }
        // A failed claim's spec goes before its record (if partitions gave
        // it one) leaves the disk: a spec never outlives its owner there.
        for u in &undo {
            self.remove_spec(&names::cdi_file(&cfg.driver, u));
        }
        let changed = {
            let mut cp = self.checkpoint.lock().await;
            for (c, p) in &planned {
                cp.claims.insert(c.uid.clone(), p.clone());
            }
            let mut changed = !planned.is_empty();
            for u in &undo {
                changed |= cp.claims.remove(*u).is_some();
            }
            if changed {
                cp.changes += 1;
            }
            changed
        };
        if changed {
            self.flush.notify_one();
        }
        for (c, p) in &planned {
            info!(
                policy = %cfg.name,
                claim = %format!("{}/{}", c.namespace, c.name),
                devices = p.devices.len(),
                read_us = read_took.as_micros() as u64,
                spec_us = spec_took.as_micros() as u64,
                "claim prepared"
            );
            answers.insert(c.uid.clone(), Ok(devices_of(p)));
        }
        if !planned.is_empty() {
            self.plugin.kick.notify_one();
            self.claims_changed.notify_one();
        }
    }

    /// Makes the partitions (MIG instances) the claims of `got` need, off
    /// the async workers (NVML blocks), and records them in the claims'
    /// begun records (made here for claims that have none) on disk before
    /// any CDI spec names them: a partition a
    /// container may use always has an owner, and one made by a prepare
    /// killed before that is removed at the next start (it has none). A
    /// claim whose partitions cannot all be made (or recorded) is answered
    /// with the error and keeps none of them.
    async fn make_partitions<'a>(
        &self,
        got: &[(&'a v1::Claim, ResourceClaim, Vec<claims::AllocResult>)],
        snap: &crate::devices::inventory::Snapshot,
        answers: &mut BTreeMap<String, Result<Vec<v1::Device>, String>>,
        undo: &mut Vec<&'a str>,
    ) -> BTreeMap<String, Vec<Made>> {
        // Only a source with partitions publishes any (a claim naming one
        // anyway is refused by `plan`: "partition ... was not made").
        let Some(parts) = self.partitioner.clone() else {
            return BTreeMap::new();
        };
        let wanted: Vec<(&'a v1::Claim, Vec<Partition>)> = got
            .iter()
            .map(|(c, _, res)| (*c, claims::partitions_needed(res, &self.node, snap)))
            .filter(|(_, p)| !p.is_empty())
            .collect();
        if wanted.is_empty() {
            return BTreeMap::new();
        }
        let jobs: Vec<(String, Vec<Partition>)> = wanted
            .iter()
            .map(|(c, p)| (c.uid.clone(), p.clone()))
            .collect();
        let outcome = tokio::task::spawn_blocking(move || {
            jobs.into_iter()
                .map(|(uid, ps)| {
                    let mut made: Vec<Made> = Vec::new();
                    for p in &ps {
                        match parts.create(p) {
                            Ok(m) => made.push(m),
                            Err(e) => {
                                for m in &made {
                                    let _ = parts.destroy(m);
                                }
                                let why = format!(
                                    "cannot make partition {} at slot {} of {}: {e}",
                                    p.profile_name, p.start, p.parent
                                );
                                return (uid, Err(why));
                            }
                        }
                    }
                    (uid, Ok(made))
                })
                .collect::<BTreeMap<String, Result<Vec<Made>, String>>>()
        })
        .await
        .unwrap_or_default();
        let mut made: BTreeMap<String, Vec<Made>> = BTreeMap::new();
        for (c, _) in &wanted {
            match outcome.get(&c.uid) {
                Some(Ok(m)) => {
                    made.insert(c.uid.clone(), m.clone());
                }
                Some(Err(e)) => {
                    answers.insert(c.uid.clone(), Err(e.clone()));
                    undo.push(&c.uid);
                }
                None => {
                    answers.insert(c.uid.clone(), Err("the partition maker stopped".into()));
                    undo.push(&c.uid);
                }
            }
        }
        if made.is_empty() {
            return made;
        }
        let mine = {
            let driver = self.plugin.cfg().driver.clone();
            let mut cp = self.checkpoint.lock().await;
            for (c, _) in &wanted {
                if let Some(m) = made.get(&c.uid) {
                    cp.claims
                        .entry(c.uid.clone())
                        .or_insert_with(|| {
                            PreparedClaim::begun(&c.namespace, &c.name, &driver, &c.uid)
                        })
                        .partitions = m.clone();
                }
            }
            cp.changes += 1;
            cp.changes
        };
        failpoint("prepare-after-partitions");
        if let Err(e) = self.persist(mine).await {
            for (c, _) in &wanted {
                if made.contains_key(&c.uid) {
                    answers.insert(
                        c.uid.clone(),
                        Err(format!(
                            "cannot record the claim's partitions in {}: {e}",
                            self.paths.checkpoint.display()
                        )),
                    );
                    undo.push(&c.uid);
                }
            }
            {
                let mut cp = self.checkpoint.lock().await;
                for uid in made.keys() {
                    if let Some(rec) = cp.claims.get_mut(uid) {
                        rec.partitions.clear();
                    }
                }
            }
            let all: Vec<Made> = made.into_values().flatten().collect();
            let _ = self.destroy_partitions(all).await;
            return BTreeMap::new();
        }
        made
    }

    /// Removes `made` (off the async workers), saying what could not be.
    async fn destroy_partitions(&self, made: Vec<Made>) -> Result<(), String> {
        if made.is_empty() {
            return Ok(());
        }
        let Some(parts) = self.partitioner.clone() else {
            return Err("this policy's source makes no partitions".into());
        };
        let failed = tokio::task::spawn_blocking(move || {
            made.iter()
                .filter_map(|m| {
                    parts
                        .destroy(m)
                        .err()
                        .map(|e| format!("cannot remove partition {} ({}): {e}", m.id, m.uuid))
                })
                .collect::<Vec<String>>()
        })
        .await
        .unwrap_or_else(|e| vec![format!("removing partitions: {e}")]);
        if failed.is_empty() {
            Ok(())
        } else {
            for f in &failed {
                warn!("{f}");
            }
            Err(failed.join("; "))
        }
    }

    /// Saves the checkpoint whenever a prepare recorded claims in memory
    /// only (see [`DraState::prepare`]), until `shutdown`, and once more
    /// then. A failed save is logged and tried again with the next change;
    /// until then a restart reads the claims whose records were not saved
    /// whole again.
    pub async fn flush_until(&self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        loop {
            let stop = tokio::select! {
                _ = crate::stopped(&mut shutdown) => true,
                _ = self.flush.notified() => false,
            };
            let upto = self.checkpoint.lock().await.changes;
            if let Err(e) = self.persist(upto).await {
                warn!(policy = %self.plugin.cfg().name, checkpoint = %self.paths.checkpoint.display(), error = %e, "cannot save the prepared claims; tried again with the next change, and new claims are refused until a save goes through");
            }
            if stop {
                return;
            }
        }
    }

    /// For claims of one call that a container names with other claims of
    /// this driver: the IDs of those other claims, which the claim's
    /// variable lists around its own (see [`claims::plan`]). Needs the pod
    /// (which container names which claims); without it, or where
    /// containers disagree, a claim lists only its own devices.
    async fn claims_around(
        &self,
        got: &[(&v1::Claim, ResourceClaim, Vec<claims::AllocResult>)],
        snap: &crate::devices::inventory::Snapshot,
    ) -> BTreeMap<String, claims::Others> {
        let Some(client) = self.reader.as_ref().or(self.client.as_ref()) else {
            return BTreeMap::new();
        };
        let Some(pod) = claims::common_pod(got.iter().map(|(_, v, _)| v)) else {
            info!(claims = ?got.iter().map(|(c, _, _)| format!("{}/{}", c.namespace, c.name)).collect::<Vec<_>>(), "a call's claims are not all reserved for one pod; each claim's variable lists its own devices only");
            return BTreeMap::new();
        };
        let ns = &got[0].0.namespace;
        let api: Api<Pod> = Api::namespaced(client.clone(), ns);
        let Ok(_turn) = self.reads.acquire().await else {
            return BTreeMap::new();
        };
        let pod_obj = match tokio::time::timeout(CLAIM_READ_TIMEOUT, api.get(&pod.0)).await {
            Ok(Ok(p)) if p.metadata.uid.as_deref() == Some(pod.1.as_str()) => p,
            Ok(Ok(p)) => {
                info!(pod = %format!("{ns}/{}", pod.0), reserved_for = %pod.1, found = %p.metadata.uid.unwrap_or_default(), "the pod of a call's claims was replaced; each claim's variable lists its own devices only");
                return BTreeMap::new();
            }
            Ok(Err(e)) => {
                warn!(pod = %format!("{ns}/{}", pod.0), error = %api_message(&e), "cannot read the pod of a call's claims; each claim's variable lists its own devices only");
                return BTreeMap::new();
            }
            Err(_) => {
                warn!(pod = %format!("{ns}/{}", pod.0), "reading the pod of a call's claims timed out; each claim's variable lists its own devices only");
                return BTreeMap::new();
            }
        };
        let ids: BTreeMap<&str, (&str, Vec<String>)> = got
            .iter()
            .map(|(c, _, res)| {
                (
                    c.name.as_str(),
                    (c.uid.as_str(), claims::physical_ids(res, &self.node, snap)),
                )
            })
            .collect();
        let around = claims::neighbours(&pod_obj, &ids);
        // Said at info: what each container's variable will list rests on it.
        info!(pod = %format!("{ns}/{}", pod.0), claims = ?ids.keys().collect::<Vec<_>>(), others = ?around, "listed a pod's claims for the policy's variable");
        around
    }
    /// Puts change `mine` of the checkpoint on disk: done already if a
    /// save since covered it, else one save of everything recorded so far
    /// (written off the async workers; the checkpoint's lock is held only
    /// to copy it, so calls go on recording meanwhile).
    async fn persist(&self, mine: u64) -> std::io::Result<()> {
        let mut saved = self.saved.lock().await;
        if *saved >= mine {
            return Ok(());
        }
        let (snapshot, upto) = {
            let cp = self.checkpoint.lock().await;
            (cp.clone(), cp.changes)
        };
        let path = self.paths.checkpoint.clone();
        let r = tokio::task::spawn_blocking(move || claims::save(&path, &snapshot))
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r);
        self.save_failing.store(r.is_err(), Ordering::Relaxed);
        r?;
        *saved = upto;
        Ok(())
    }

    /// Removes the claim CDI spec `file` (gone already is fine; another
    /// failure is said in the log: the spec has no owner then).
    fn remove_spec(&self, file: &str) {
        match std::fs::remove_file(self.cdi_dir.join(file)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!(file = %file, error = %e, "cannot remove a claim's CDI spec"),
        }
    }

    /// Unprepares one claim: removes what prepare made (idempotent),
    /// serialised with every other call for the same claim.
    pub async fn unprepare_one(&self, c: &v1::Claim) -> Result<(), String> {
        let lock = self.claim_locks.of(&c.uid);
        let r = {
            let _one_at_a_time = lock.lock().await;
            self.unprepare_locked(c).await
        };
        self.claim_locks.release(&c.uid, lock);
        r
    }

    async fn unprepare_locked(&self, c: &v1::Claim) -> Result<(), String> {
        // Partitions go first: one that cannot be removed (still in use)
        // keeps the claim recorded, and the kubelet's retry tries again.
        let partitions = {
            let cp = self.checkpoint.lock().await;
            cp.claims
                .get(&c.uid)
                .map(|p| p.partitions.clone())
                .unwrap_or_default()
        };
        self.destroy_partitions(partitions).await?;
        failpoint("unprepare-after-partitions");
        // The spec goes first, then the record: a kill in between leaves a
        // record with no spec, which the kubelet's retry forgets, and never
        // a spec whose claim is gone (the next start would take it for a
        // prepare cut short and keep it).
        let file = {
            let cp = self.checkpoint.lock().await;
            match cp.claims.get(&c.uid) {
                Some(p) => p.cdi_file.clone(),
                None => Some(names::cdi_file(&self.plugin.cfg().driver, &c.uid)),
            }
        };
        if let Some(f) = &file {
            self.remove_spec(f);
        }
        failpoint("unprepare-after-spec");
        let (p, mine) = {
            let mut cp = self.checkpoint.lock().await;
            let Some(p) = cp.claims.remove(&c.uid) else {
                return Ok(());
            };
            cp.changes += 1;
            (p, cp.changes)
        };
        if let Err(e) = self.persist(mine).await {
            // Not forgotten on disk: the record stays (its spec is written
            // again if the kubelet prepares it once more), and the kubelet
            // tries again.
            let mut cp = self.checkpoint.lock().await;
            cp.claims.insert(c.uid.clone(), p);
            cp.changes += 1;
            return Err(format!(
                "cannot update {}: {e}",
                self.paths.checkpoint.display()
            ));
        }
        info!(policy = %self.plugin.cfg().name, claim = %format!("{}/{}", c.namespace, c.name), "claim unprepared");
        self.plugin.kick.notify_one();
        self.claims_changed.notify_one();
        Ok(())
    }

    async fn unprepare(&self, claims: Vec<v1::Claim>) -> v1::NodeUnprepareResourcesResponse {
        let mut out = v1::NodeUnprepareResourcesResponse::default();
        let resource = self.plugin.cfg().resource_name.clone();
        for c in claims {
            let start = std::time::Instant::now();
            let error = self.unprepare_one(&c).await.err().unwrap_or_default();
            self.plugin
                .metrics
                .dra_call("unprepare", &resource, error.is_empty(), start.elapsed());
            out.claims
                .insert(c.uid, v1::NodeUnprepareResourceResponse { error });
        }
        out
    }

    /// Every device's health, as the kubelet's health service wants it.
    pub fn health(&self) -> health::NodeWatchResourcesResponse {
        let snap = self.plugin.snapshots.borrow().clone();
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or_default();
        let mut devices = Vec::new();
        for (id, state) in &snap.devices {
            let h = health::HealthStatus::from(&state.health);
            let message = state.health.reason();
            devices.push(health::DeviceHealth {
                device: Some(health::DeviceIdentifier {
                    pool_name: self.node.clone(),
                    device_name: names::device_name(id),
                }),
                health: h as i32,
                last_updated_time: now,
                health_check_timeout_seconds: HEALTH_TIMEOUT_SECONDS,
                message: message.chars().take(1024).collect(),
            });
        }
        health::NodeWatchResourcesResponse { devices }
    }
}

/// The DRA services; cheap to clone.
#[derive(Clone)]
pub struct DraService(pub Arc<DraState>);

fn to_v1(c: v1beta1::Claim) -> v1::Claim {
    v1::Claim {
        namespace: c.namespace,
        uid: c.uid,
        name: c.name,
    }
}

#[tonic::async_trait]
impl v1::dra_plugin_server::DraPlugin for DraService {
    async fn node_prepare_resources(
        &self,
        req: Request<v1::NodePrepareResourcesRequest>,
    ) -> Result<Response<v1::NodePrepareResourcesResponse>, Status> {
        Ok(Response::new(self.0.prepare(req.into_inner().claims).await))
    }

    async fn node_unprepare_resources(
        &self,
        req: Request<v1::NodeUnprepareResourcesRequest>,
    ) -> Result<Response<v1::NodeUnprepareResourcesResponse>, Status> {
        Ok(Response::new(
            self.0.unprepare(req.into_inner().claims).await,
        ))
    }
}

#[tonic::async_trait]
impl v1beta1::dra_plugin_server::DraPlugin for DraService {
    async fn node_prepare_resources(
        &self,
        req: Request<v1beta1::NodePrepareResourcesRequest>,
    ) -> Result<Response<v1beta1::NodePrepareResourcesResponse>, Status> {
        let claims = req.into_inner().claims.into_iter().map(to_v1).collect();
        let r = self.0.prepare(claims).await;
        let claims: std::collections::HashMap<String, v1beta1::NodePrepareResourceResponse> = r
            .claims
            .into_iter()
            .map(|(uid, c)| {
                (
                    uid,
                    v1beta1::NodePrepareResourceResponse {
                        devices: c
                            .devices
                            .into_iter()
                            .map(|d| v1beta1::Device {
                                request_names: d.request_names,
                                pool_name: d.pool_name,
                                device_name: d.device_name,
                                cdi_device_ids: d.cdi_device_ids,
                            })
                            .collect(),
                        error: c.error,
                    },
                )
            })
            .collect();
        Ok(Response::new(v1beta1::NodePrepareResourcesResponse {
            claims,
        }))
    }

    async fn node_unprepare_resources(
        &self,
        req: Request<v1beta1::NodeUnprepareResourcesRequest>,
    ) -> Result<Response<v1beta1::NodeUnprepareResourcesResponse>, Status> {
        let claims = req.into_inner().claims.into_iter().map(to_v1).collect();
        let r = self.0.unprepare(claims).await;
        let claims = r
            .claims
            .into_iter()
            .map(|(uid, c)| {
                (
                    uid,
                    v1beta1::NodeUnprepareResourceResponse { error: c.error },
                )
            })
            .collect();
        Ok(Response::new(v1beta1::NodeUnprepareResourcesResponse {
            claims,
        }))
    }
}

type HealthStream =
    Pin<Box<dyn Stream<Item = Result<health::NodeWatchResourcesResponse, Status>> + Send>>;

#[tonic::async_trait]
impl health::dra_resource_health_server::DraResourceHealth for DraService {
    type NodeWatchResourcesStream = HealthStream;

    async fn node_watch_resources(
        &self,
        _: Request<health::NodeWatchResourcesRequest>,
    ) -> Result<Response<Self::NodeWatchResourcesStream>, Status> {
        let state = self.0.clone();
        let (tx, rx) = mpsc::channel(1);
        let mut snaps = state.plugin.snapshots.clone();
        let mut shutdown = state.plugin.shutdown.clone();
        info!(policy = %state.plugin.cfg().name, "health stream opened");
        tokio::spawn(async move {
            loop {
                snaps.borrow_and_update();
                if tx.send(Ok(state.health())).await.is_err() {
                    break;
                }
                tokio::select! {
                    _ = tx.closed() => break,
                    _ = crate::stopped(&mut shutdown) => break,
                    changed = snaps.changed() => if changed.is_err() { break },
                    _ = tokio::time::sleep(HEALTH_HEARTBEAT) => {}
                }
            }
            debug!("health stream ended");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// The plugin watcher's view of us.
#[derive(Clone)]
pub struct Registrar(pub Arc<DraState>);

#[tonic::async_trait]
impl reg::registration_server::Registration for Registrar {
    async fn get_info(
        &self,
        _: Request<reg::InfoRequest>,
    ) -> Result<Response<reg::PluginInfo>, Status> {
        Ok(Response::new(plugin_info(&self.0)))
    }

    async fn notify_registration_status(
        &self,
        req: Request<reg::RegistrationStatus>,
    ) -> Result<Response<reg::RegistrationStatusResponse>, Status> {
        let s = req.into_inner();
        let plugin = &self.0.plugin;
        let name = plugin.cfg().name.clone();
        if s.plugin_registered {
            plugin.registered.store(true, Ordering::SeqCst);
            plugin.registrations.fetch_add(1, Ordering::SeqCst);
            info!(policy = %name, driver = %plugin.cfg().driver, "registered with the kubelet (DRA)");
        } else {
            plugin.registered.store(false, Ordering::SeqCst);
            warn!(policy = %name, error = %s.error, "the kubelet refused the DRA registration");
        }
        Ok(Response::new(reg::RegistrationStatusResponse {}))
    }
}

/// What GetInfo answers.
pub fn plugin_info(state: &DraState) -> reg::PluginInfo {
    reg::PluginInfo {
        r#type: reg::DRA_PLUGIN.into(),
        name: state.plugin.cfg().driver.clone(),
        endpoint: state.paths.endpoint.display().to_string(),
        supported_versions: vec![
            v1::SERVICE.into(),
            v1beta1::SERVICE.into(),
            health::SERVICE.into(),
        ],
    }
}

/// Claims prepared before, by UID (for tests and the checkpoint's owner).
pub async fn prepared(state: &DraState) -> BTreeMap<String, PreparedClaim> {
    state.checkpoint.lock().await.claims.clone()
}

/// A device's health as the kubelet's DRA health service has it (the
/// reason goes in the message).
impl From<&Health> for health::HealthStatus {
    fn from(h: &Health) -> health::HealthStatus {
        match h {
            Health::Healthy => health::HealthStatus::Healthy,
            Health::Unhealthy(_) => health::HealthStatus::Unhealthy,
            Health::Unknown(_) => health::HealthStatus::Unknown,
        }
    }
}
