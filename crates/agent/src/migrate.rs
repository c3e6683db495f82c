//! Live migration between hosts: this agent moves a running VM to another host's agent, or
//! takes one another host's agent moves here.
//!
//! The agents talk over TCP with mutual TLS (TLS 1.3, rustls): each side shows a certificate
//! signed by the operator's migration CA and accepts only a peer whose certificate that CA
//! signed, so a host that is not the operator's cannot send or receive a VM. The sender checks
//! that the certificate names the destination it dialled (its IP address or DNS name).
//!
//! On one connection, driven by the sender:
//! 1. the sender sends a [`Prepare`] line: the VM's record, its disks' sizes and images' hashes,
//!    and the CPU its guest was shown (the receiver refuses a VM whose CPU features it lacks);
//! 2. the receiver makes the VM as a create would (the same validation and admission; the same
//!    id, SMBIOS UUID, MACs, addresses and metadata; its own empty files for the disks the
//!    stream copies), marks it `incoming`, wires its NICs and launches a VMM that waits for
//!    the stream; then it answers a [`Prepared`] line (or a refusal naming the problem, and
//!    nothing is left behind);
//! 3. the connection then carries the VMMs' migration stream (`bexar_vmm::migration`): the
//!    sender's VMM writes into a socket this agent listens on, each agent relays between its
//!    VMM and the TLS connection;
//! 4. when the receiving VMM holds the VM it answers the sending VMM, which ends; the sender's
//!    agent then deletes the VM here (VMM, TAPs, filters, files) and the receiver's records it
//!    running. If anything fails before that answer the VM goes on here and the receiver
//!    deletes what it made.
//!
//! A disk made from an image (a qcow2 overlay on a registered base image) moves without its
//! base: the destination must hold an image with the same content hash, makes its own empty
//! overlay on it, and the stream carries only what the sender's overlay holds. A writable
//! qcow2 `path` disk is refused (its backing chain is the operator's files, which the
//! destination has no way to match).
//!
//! While the VMMs work, the sender's relay follows the stream (`StreamWatch`): the sending
//! VMM's progress reports (each round's start: what is left, the rates, the pause expected;
//! the switch-over's start) go into the VM's `operation.progress` and `migrating` events, and
//! `POST /v1/vms/{id}/migrate/cancel` has the relay send the VMM a cancel byte, which it honours
//! until the switch-over begins (the VM goes on here; the migration's request ends with 409
//! `migration_cancelled`). Once the relay has seen the switch-over begin, a cancel is refused.
//! `POST /v1/vms/{id}/migrate/complete` sends a complete byte instead: the VMM finishes the
//! round under way without its bandwidth limit and switches over, whatever the budget.
//!
//! A migration in doubt (the whole VM went, no answer came back) is settled between the agents:
//! the sender asks the destination with a [`Query`] line on a new connection whether it holds
//! the VM, and deletes its paused copy or resumes it by the answer. The receiving relay records
//! its VMM's commit (`layout::INCOMING_COMMITTED`) before passing it on, so "held" is known.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use super::events::EventKind;
use super::spec::{Desired, FieldError, Operation, OperationKind as Op, Phase, VmRecord};
use super::store::layout;
use super::{now_ms, Agent, AgentError, VmEntry};
use bexar_util::sync::lock;

/// The migration listener and the certificates both directions use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationConfig {
    /// Where to take migrations from other hosts (`None`: this host only sends).
    pub listen: Option<SocketAddr>,
    /// This host's certificate chain (PEM), signed by the migration CA.
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The migration CA's certificate(s) (PEM): the hosts it signed are the known hosts.
    pub ca: PathBuf,
}

/// The TLS configurations made from a [`MigrationConfig`].
pub struct MigrationTls {
    acceptor: tokio_rustls::TlsAcceptor,
    connector: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for MigrationTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MigrationTls")
    }
}

impl MigrationTls {
    /// Reads the certificates and key; an error names the file and what is wrong with it.
    pub fn load(c: &MigrationConfig) -> Result<Self, String> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = |path: &PathBuf| {
            CertificateDer::pem_file_iter(path)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("{}: {e}", path.display()))
                .and_then(|v| {
                    if v.is_empty() {
                        Err(format!("{}: no certificate", path.display()))
                    } else {
                        Ok(v)
                    }
                })
        };
        let chain = certs(&c.cert)?;
        let key = PrivateKeyDer::from_pem_file(&c.key)
            .map_err(|e| format!("{}: {e}", c.key.display()))?;
        let mut roots = rustls::RootCertStore::empty();
        for ca in certs(&c.ca)? {
            roots
                .add(ca)
                .map_err(|e| format!("{}: {e}", c.ca.display()))?;
        }
        let roots = Arc::new(roots);
        // ring rather than rustls's default aws-lc-rs (a large C build); ring offers no
        // post-quantum key exchange, which rustls 0.23.48 marks by deprecating it
        // (docs/architecture.md).
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()
        .map_err(|e| format!("{}: {e}", c.ca.display()))?;
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(tls13)
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| format!("{}: {e}", c.cert.display()))?;
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(tls13)
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| format!("{}: {e}", c.cert.display()))?;
        Ok(Self {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
            connector: tokio_rustls::TlsConnector::from(Arc::new(client)),
        })
    }
}

/// `POST /v1/vms/{id}/migrate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// The destination agent's migration listener, `HOST:PORT` (an IP address or a DNS name
    /// its certificate carries).
    pub destination: String,
    /// The largest pause wanted, milliseconds (default 100); within it, pre-copy goes on a few
    /// rounds more while each still halves what is left or it would take over 10 ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u32>,
    /// The most pre-copy rounds (default 30; 0: a stop-and-copy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rounds: Option<u32>,
    /// The most MiB a second the copy sends while the guest runs (default: no limit; the
    /// switch-over is never limited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bandwidth_mib: Option<u32>,
}

/// What a migration did (the answer to `POST /v1/vms/{id}/migrate`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationOutcome {
    /// The VM.
    pub id: String,
    /// Where it runs now.
    pub destination: String,
    /// The VMM's report: rounds, pages and disk bytes sent, the pause, the time in all.
    pub migration: bexar_vmm::migration::MigrationReport,
    /// Set when the destination's answer never reached the VMM here (the migration was in
    /// doubt) and the destination, asked, said it holds the VM: how it was settled. The
    /// report is then empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settled: Option<String>,
}

/// The sender's first line.
#[derive(Debug, Serialize, Deserialize)]
struct Prepare {
    /// The VM as the sender records it.
    record: VmRecord,
    /// Each disk's size in bytes, for those the stream copies.
    disk_sizes: Vec<Option<u64>>,
    /// For each disk made from an image, the image's content hash (SHA-256, hex): the
    /// destination needs an image with the same content for its overlay.
    #[serde(default)]
    image_sha256: Vec<Option<String>>,
    /// The CPU the guest sees here (its template on this host's KVM): the destination must
    /// offer every feature of it.
    #[serde(default)]
    cpu: Option<bexar_vmm::cpuid::CpuFeatures>,
}

/// The CPU a guest of `spec` sees on this host (`None` without KVM or with an unknown
/// template, which the spec's validation reports).
fn guest_cpu(spec: &super::spec::VmSpec) -> Option<bexar_vmm::cpuid::CpuFeatures> {
    let template = bexar_vmm::cpuid::CpuTemplate::from_name(&spec.cpu_template).ok()?;
    let kvm = kvm_ioctls::Kvm::new().ok()?;
    let supported =
        bexar_vmm::cpuid::supported(&kvm, bexar_vmm::platform::Platform::detect()).ok()?;
    Some(bexar_vmm::cpuid::CpuFeatures::of(
        &supported, template, spec.vcpus,
    ))
}

/// The receiver's answer to [`Prepare`].
#[derive(Debug, Default, Serialize, Deserialize)]
struct Prepared {
    ok: bool,
    /// The API error code the receiver's own API would give (`over_capacity`, ...).
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

/// `HOST:PORT` of a migration listener: the host, the port and the name its certificate
/// must carry.
fn parse_destination(
    destination: &str,
) -> Result<(String, u16, rustls::pki_types::ServerName<'static>), AgentError> {
    let (host, port) = destination
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.trim_matches(['[', ']']), p.parse::<u16>().ok()?)))
        .filter(|(h, p)| !h.is_empty() && *p != 0)
        .ok_or_else(|| field("destination", "not HOST:PORT"))?;
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| field("destination", format!("{host}: {e}")))?;
    Ok((host.to_owned(), port, name))
}

/// A sender's question after a migration in doubt: does this host hold the VM?
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Query {
    /// The VM's id.
    query: String,
    /// Its SMBIOS UUID (a VM made here since under the same id is another VM).
    uuid: uuid::Uuid,
}

/// The answer to a [`Query`].
#[derive(Debug, Default, Serialize, Deserialize)]
struct Holds {
    /// This host has the VM (running, or ended here after it arrived).
    held: bool,
    /// It is still arriving (its VMM has not answered yet): ask again.
    arriving: bool,
}

/// The first line a migration listener reads.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Hello {
    Query(Query),
    Prepare(Box<Prepare>),
}

/// A migration under way, as `POST /v1/vms/{id}/migrate/cancel` and `.../migrate/complete`
/// reach it.
#[derive(Debug, Default)]
pub(crate) struct Cancel {
    /// Wakes the relay, which sends the VMM [`bexar_vmm::migration::CANCEL`] or
    /// [`bexar_vmm::migration::COMPLETE`].
    notify: tokio::sync::Notify,
    /// The cancel was asked for.
    asked: std::sync::atomic::AtomicBool,
    /// Completing now (the switch-over after the round under way) was asked for.
    complete: std::sync::atomic::AtomicBool,
    /// The switch-over has begun (as far as the stream relayed says): too late to cancel.
    switching: std::sync::atomic::AtomicBool,
}

/// Makes a migration reachable by `migrate/cancel` and `migrate/complete` while it lives.
struct Reachable<'a>(&'a super::VmEntry);

impl<'a> Reachable<'a> {
    fn new(entry: &'a super::VmEntry, cancel: Arc<Cancel>) -> Self {
        *lock(&entry.migration) = Some(cancel);
        Self(entry)
    }
}

impl Drop for Reachable<'_> {
    fn drop(&mut self) {
        *lock(&self.0.migration) = None;
    }
}

/// How sending the VM failed, which says where it is.
#[derive(Debug)]
enum SendFailed {
    /// Not sent, or refused: the VM goes on here.
    Refused(String),
    /// Cancelled before the switch-over: the VM goes on here.
    Cancelled,
    /// All sent, no answer from the receiver: the VM is paused here and may run there.
    InDoubt,
    /// The VMM did not answer: its end says whether it handed the VM over.
    NoAnswer(String),
}

/// What the VMM's error says when a migration is in doubt
/// ([`bexar_vmm::migration::MigrationError::InDoubt`]); only its text crosses the control
/// socket.
const IN_DOUBT: &str = "in doubt";

/// What the VMM's error says when the migration was cancelled
/// ([`bexar_vmm::migration::MigrationError::Cancelled`]).
const CANCELLED: &str = "cancelled before the switch-over";

/// How long a migration in doubt asks the destination before its request returns (the asking
/// goes on in the background).
const IN_DOUBT_ASKING: Duration = Duration::from_secs(30);
/// The longest wait between two questions to the destination of a migration in doubt.
const IN_DOUBT_MAX_DELAY: Duration = Duration::from_secs(5);

/// The longest line either side reads before the stream.
const MAX_LINE: u64 = 4 << 20;
/// Connecting, the TLS handshake, and each line before the stream.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// The sending VMM's whole migration, from the request to its answer.
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(30 * 60);

fn field(name: &str, message: impl Into<String>) -> AgentError {
    AgentError::Invalid(FieldError::new(name, message.into()))
}

/// The sender's relay: takes the VMM's connection on `listener`, then carries the stream to
/// the destination, following it to report the VMM's progress (and to see the switch-over
/// begin, after which a cancel is too late), and the destination's answer back, with a
/// [`bexar_vmm::migration::CANCEL`] sent to the VMM when `cancel` is asked for.
async fn relay_out(
    listener: UnixListener,
    conn: BufReader<tokio_rustls::client::TlsStream<TcpStream>>,
    progress: tokio::sync::watch::Sender<Option<bexar_vmm::migration::MigrationProgress>>,
    cancel: Arc<Cancel>,
) -> std::io::Result<()> {
    use bexar_vmm::migration::{MigrationPhase, StreamWatch, CANCEL, COMPLETE};
    let (vmm, _) = tokio::time::timeout(STEP_TIMEOUT, listener.accept())
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no VMM"))??;
    let (mut vmm_r, mut vmm_w) = vmm.into_split();
    // Whatever the destination sent after its answer is the receiving VMM's.
    let early = conn.buffer().to_vec();
    vmm_w.write_all(&early).await?;
    let (mut conn_r, mut conn_w) = tokio::io::split(conn.into_inner());
    let out = async {
        let mut watch = StreamWatch::default();
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = vmm_r.read(&mut buf).await?;
            if n == 0 {
                return conn_w.shutdown().await;
            }
            watch.feed(&buf[..n]);
            if let Some(p) = &watch.progress {
                if p.phase == MigrationPhase::SwitchOver {
                    cancel
                        .switching
                        .store(true, std::sync::atomic::Ordering::SeqCst);
                }
                if progress.borrow().as_ref() != Some(p) {
                    progress.send_replace(Some(p.clone()));
                }
            }
            // Sent now: a TLS writer may keep the tail of what it took until a flush, and the
            // switch-over's last bytes are the pause.
            conn_w.write_all(&buf[..n]).await?;
            conn_w.flush().await?;
        }
    };
    let back = async {
        use std::sync::atomic::Ordering::SeqCst;
        let mut buf = vec![0u8; 4096];
        let (mut cancelled, mut completing) = (false, false);
        loop {
            tokio::select! {
                r = conn_r.read(&mut buf) => {
                    let n = r?;
                    if n == 0 {
                        return vmm_w.shutdown().await;
                    }
                    vmm_w.write_all(&buf[..n]).await?;
                }
                () = cancel.notify.notified(), if !cancelled => {
                    if cancel.asked.load(SeqCst) {
                        cancelled = true;
                        vmm_w.write_all(&[CANCEL]).await?;
                    } else if cancel.complete.load(SeqCst) && !completing {
                        completing = true;
                        vmm_w.write_all(&[COMPLETE]).await?;
                    }
                }
            }
        }
    };
    tokio::try_join!(out, back).map(|_| ())
}

/// Records, durably (the file and its directory synced), that a VMM receiving a VM told the
/// sender it holds it.
async fn mark_committed(path: PathBuf) -> std::io::Result<()> {
    tokio::task::spawn_blocking(move || {
        std::fs::File::create(&path)?.sync_all()?;
        bexar_util::fs::sync_dir(path.parent().unwrap_or(std::path::Path::new(".")))
            .map_err(std::io::Error::other)
    })
    .await
    .map_err(std::io::Error::other)?
}

/// The API code of an error, as a refusal sent to the other agent.
fn refusal(e: &AgentError) -> Prepared {
    let code = match e {
        AgentError::Capacity(_) => "over_capacity",
        AgentError::Exists(_) => "already_exists",
        AgentError::Invalid(_) => "invalid_field",
        AgentError::SegmentNotFound(_) | AgentError::ImageNotFound(_) => "not_found",
        _ => "conflict",
    };
    Prepared {
        ok: false,
        code: code.into(),
        message: e.to_string(),
    }
}

async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> std::io::Result<String> {
    let mut line = String::new();
    let n = tokio::time::timeout(STEP_TIMEOUT, r.take(MAX_LINE).read_line(&mut line))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))??;
    if n == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(line)
}

async fn write_line<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    value: &impl Serialize,
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await?;
    w.flush().await
}

impl Agent {
    fn migration_tls(&self) -> Result<&MigrationTls, AgentError> {
        self.migration.as_deref().ok_or_else(|| {
            field(
                "destination",
                "this agent has no migration certificates (--migration-cert, --migration-key, \
                 --migration-ca)",
            )
        })
    }

    /// A TLS connection to the migration listener at `destination`, whose certificate the CA
    /// signed for that name.
    async fn connect(
        &self,
        destination: &str,
    ) -> Result<BufReader<tokio_rustls::client::TlsStream<TcpStream>>, AgentError> {
        let tls = self.migration_tls()?;
        let (host, port, name) = parse_destination(destination)?;
        let tcp = tokio::time::timeout(STEP_TIMEOUT, TcpStream::connect((host.as_str(), port)))
            .await
            .map_err(|_| field("destination", format!("{destination}: no answer")))?
            .map_err(|e| field("destination", format!("{destination}: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let conn = tokio::time::timeout(STEP_TIMEOUT, tls.connector.connect(name, tcp))
            .await
            .map_err(|_| field("destination", "the TLS handshake did not finish"))?
            .map_err(|e| {
                field(
                    "destination",
                    format!("{destination} is not a known host: {e}"),
                )
            })?;
        Ok(BufReader::new(conn))
    }

    /// Asks the agent at `destination` whether it holds VM `id` (the same VM: `uuid`).
    async fn ask(&self, destination: &str, id: &str, uuid: uuid::Uuid) -> Result<Holds, String> {
        let mut conn = self.connect(destination).await.map_err(|e| e.to_string())?;
        let q = Query {
            query: id.to_owned(),
            uuid,
        };
        write_line(conn.get_mut(), &q)
            .await
            .map_err(|e| e.to_string())?;
        let line = read_line(&mut conn).await.map_err(|e| e.to_string())?;
        serde_json::from_str(&line).map_err(|e| e.to_string())
    }

    /// Asks the agent at `destination`, again and again until it answers or `until` passes,
    /// whether it holds the VM of a migration in doubt (the whole VM went and no answer came
    /// back; the VMM here keeps the guest paused): `Some(true)` if it does (its VMM told the
    /// sender it holds the VM, or runs it), `Some(false)` if it has no such VM (the guest
    /// never ran there: a receiving VMM runs it only after its answer, which its agent
    /// records before passing it on), `None` if undecided by `until`. While the VM is still
    /// arriving there, it asks again.
    async fn ask_until(
        &self,
        entry: &Arc<VmEntry>,
        destination: &str,
        until: Option<tokio::time::Instant>,
    ) -> Option<bool> {
        let uuid = Self::snapshot(entry).uuid;
        let mut delay = Duration::from_millis(50);
        loop {
            match self.ask(destination, &entry.id, uuid).await {
                Ok(h) if h.arriving => {}
                Ok(h) => return Some(h.held),
                Err(e) => tracing::info!(vm = %entry.id, "asking {destination} about the VM: {e}"),
            }
            if until.is_some_and(|u| tokio::time::Instant::now() + delay > u) {
                return None;
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(IN_DOUBT_MAX_DELAY);
        }
    }

    /// Acts on the answer to a migration in doubt: the VM is deleted here if `there`, else
    /// resumed here (its VMM thaws its devices). The caller holds the operation lock.
    async fn settle_in_doubt(
        self: &Arc<Self>,
        entry: &Arc<VmEntry>,
        destination: &str,
        there: bool,
    ) {
        if there {
            let message = format!(
                "the migration in doubt is settled: the VM runs on {destination}; deleted here"
            );
            self.events.emit(
                &entry.id,
                EventKind::Migrated,
                Some(Phase::Running),
                message,
            );
            let _ = self.update(entry, |r| {
                r.state = Phase::Deleting;
                r.desired = Desired::Stopped;
            });
            if let Err(e) = self.finish_delete(entry).await {
                tracing::error!(vm = %entry.id, "cannot remove a VM that moved: {e}");
            }
            return;
        }
        let dir = self.vm_dir(&entry.id);
        let resumed = lock(&entry.vmm).is_some()
            && super::vmm_process::call(&dir, &bexar_vmm::control::Request::Resume)
                .await
                .is_ok();
        let message = format!(
            "the migration in doubt is settled: {destination} does not hold the VM; {}",
            if resumed {
                "it goes on here"
            } else {
                "its VMM here is gone too"
            }
        );
        let _ = self.update(entry, |r| {
            r.operation = None;
            if resumed {
                r.state = Phase::Running;
                r.desired = Desired::Running;
            }
        });
        self.events.emit(
            &entry.id,
            EventKind::Resumed,
            resumed.then_some(Phase::Running),
            message,
        );
    }

    /// Settles a migration in doubt in the background (after the request's own asking ran out,
    /// or when an agent restart adopts a VMM paused by one): asks the destination without
    /// holding the VM's operation lock (the VM stays paused, and a caller may still delete or
    /// resume it by hand meanwhile), then acts under the lock if the VM is still in doubt.
    pub(crate) fn settle_in_doubt_later(
        self: &Arc<Self>,
        entry: &Arc<VmEntry>,
        destination: String,
    ) {
        let agent = self.clone();
        let entry = entry.clone();
        tokio::spawn(async move {
            let in_doubt = |entry: &VmEntry| {
                let rec = Self::snapshot(entry);
                rec.state == Phase::Paused && rec.operation.is_some_and(|o| o.kind == Op::Migrate)
            };
            loop {
                let until = tokio::time::Instant::now() + IN_DOUBT_ASKING;
                let Some(there) = agent.ask_until(&entry, &destination, Some(until)).await else {
                    if !in_doubt(&entry) {
                        return;
                    }
                    continue;
                };
                let _op = entry.op.lock().await;
                let same = lock(&agent.vms)
                    .get(&entry.id)
                    .is_some_and(|e| Arc::ptr_eq(e, &entry));
                if same && in_doubt(&entry) {
                    agent.settle_in_doubt(&entry, &destination, there).await;
                }
                return;
            }
        });
    }

    /// Moves running VM `id` to the agent at `req.destination` (see the module's description).
    pub async fn migrate(
        self: &Arc<Self>,
        id: &str,
        req: MigrateRequest,
    ) -> Result<MigrationOutcome, AgentError> {
        parse_destination(&req.destination)?;
        self.migration_tls()?;
        self.recovered().await;
        let entry = self.entry(id)?;
        let _op = entry.op.lock().await;
        let rec = Self::snapshot(&entry);
        if rec.state != Phase::Running {
            return Err(super::lifecycle::illegal(&rec, "migrate"));
        }
        // A cancel or a complete reaches the migration from here on, before the destination
        // has answered: a scheduler calls the migration under way (and may abort it) from the
        // moment it asked for it.
        let cancel = Arc::new(Cancel::default());
        let reachable = Reachable::new(&entry, cancel.clone());
        // Which disks the stream copies, and the ones it cannot move.
        let mut disk_sizes = Vec::new();
        let mut image_sha256 = Vec::new();
        for (i, d) in rec.spec.disks.iter().enumerate() {
            // An overlay moves alone: the destination makes its own on the same base image
            // (the same content), and the stream fills it with what this one holds.
            image_sha256.push(match &d.image {
                Some(id) => Some(
                    self.images
                        .get(id)
                        .map_err(|e| {
                            AgentError::Conflict(FieldError::new(
                                format!("spec.disks[{i}].image"),
                                e.to_string(),
                            ))
                        })?
                        .sha256,
                ),
                None => None,
            });
            let qcow2 =
                rec.disks.get(i).map(|s| s.format) == Some(bexar_devices::block::DiskFormat::Qcow2);
            if d.path.is_some() && !d.read_only && qcow2 {
                return Err(AgentError::Conflict(FieldError::new(
                    format!("spec.disks[{i}]"),
                    "a writable qcow2 path disk cannot be migrated (its backing chain is the \
                     operator's, not known to the destination): give the VM a disk made from \
                     a registered image instead",
                )));
            }
            let size = match (&d.path, d.read_only) {
                (Some(path), false) => Some(
                    std::fs::metadata(path)
                        .map_err(|e| {
                            AgentError::Conflict(FieldError::new(
                                format!("spec.disks[{i}].path"),
                                format!("{}: {e}", path.display()),
                            ))
                        })?
                        .len(),
                ),
                _ if d.image.is_some() => rec.disks.get(i).map(|s| s.size),
                _ => None,
            };
            disk_sizes.push(size);
        }
        // The destination, proven by its certificate, and its answer.
        let mut conn = self.connect(&req.destination).await?;
        let prepare = Prepare {
            record: rec.clone(),
            disk_sizes,
            image_sha256,
            cpu: guest_cpu(&rec.spec),
        };
        let lost = |e: std::io::Error| {
            AgentError::MigrationFailed(format!("the destination went away: {e}"))
        };
        write_line(conn.get_mut(), &prepare).await.map_err(lost)?;
        let answer: Prepared = serde_json::from_str(&read_line(&mut conn).await.map_err(lost)?)
            .map_err(|e| AgentError::MigrationFailed(format!("the destination's answer: {e}")))?;
        if !answer.ok {
            let why = format!("the destination refused the VM: {}", answer.message);
            return Err(match answer.code.as_str() {
                "over_capacity" => AgentError::Capacity(why),
                _ => AgentError::Conflict(FieldError::new("destination", why)),
            });
        }
        // The destination holds an `incoming` copy waiting for the stream. A cancel that came
        // meanwhile ends it here (the destination sees the connection close and removes its
        // copy), as does the end of the VMM while the destination prepared.
        if cancel.asked.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(self.cancelled(id, &req.destination, "the copy began"));
        }
        let alive = lock(&entry.vmm).is_some();
        let rec = self.update(&entry, |r| {
            if alive && r.state == Phase::Running {
                r.operation = super::lifecycle::op(Op::Migrate);
                if let Some(o) = r.operation.as_mut() {
                    o.destination = Some(req.destination.clone());
                }
            }
        })?;
        if !alive || rec.operation.as_ref().map(|o| o.kind) != Some(Op::Migrate) {
            return Err(super::lifecycle::illegal(&rec, "migrate"));
        }
        let ended = self.send_vm(&entry, &rec, conn, &req, &cancel).await;
        drop(reachable);
        match ended {
            Ok(report) => {
                let message = format!(
                    "moved to {}: paused {:.1} ms, {} bytes sent ({} of disk), {:.0} ms in all",
                    req.destination,
                    report.paused_ms,
                    report.bytes_sent,
                    report.disk_bytes,
                    report.total_ms
                );
                self.events
                    .emit(id, EventKind::Migrated, Some(Phase::Running), message);
                // The VM is the destination's: nothing of it stays here.
                self.update(&entry, |r| {
                    r.state = Phase::Deleting;
                    r.desired = Desired::Stopped;
                })?;
                self.finish_delete(&entry).await?;
                Ok(MigrationOutcome {
                    id: id.to_owned(),
                    destination: req.destination,
                    migration: report,
                    settled: None,
                })
            }
            Err(SendFailed::InDoubt) => {
                // Everything went and no answer came back: the destination may run the VM.
                // Its VMM here keeps the guest paused, the operation stays `migrate`, and the
                // destination is asked whether it holds the VM (for a while here, then in the
                // background: an agent restart there takes seconds).
                let message = format!(
                    "live migration to {} in doubt: the guest is paused here and may run there; \
                     asking {}",
                    req.destination, req.destination
                );
                let _ = self.update(&entry, |r| {
                    r.state = Phase::Paused;
                    r.desired = Desired::Paused;
                });
                self.events
                    .emit(id, EventKind::Paused, Some(Phase::Paused), message.clone());
                let until = tokio::time::Instant::now() + IN_DOUBT_ASKING;
                let verdict = self.ask_until(&entry, &req.destination, Some(until)).await;
                if let Some(there) = verdict {
                    self.settle_in_doubt(&entry, &req.destination, there).await;
                }
                match verdict {
                    Some(true) => Ok(MigrationOutcome {
                        id: id.to_owned(),
                        destination: req.destination.clone(),
                        migration: Default::default(),
                        settled: Some(format!(
                            "no answer came from the destination's VMM; {} said it holds the VM",
                            req.destination
                        )),
                    }),
                    Some(false) => Err(AgentError::MigrationFailed(format!(
                        "no answer came from the destination's VMM, and {} does not hold the \
                         VM: it goes on here",
                        req.destination
                    ))),
                    None => {
                        self.settle_in_doubt_later(&entry, req.destination.clone());
                        Err(AgentError::MigrationFailed(message))
                    }
                }
            }
            Err(SendFailed::NoAnswer(why)) => {
                // The operation stays `migrate`: the VMM's end, when it comes, is settled by
                // what the VMM says of it, never by a restart here. An end recorded already
                // (before the operation was) needs no more.
                if lock(&entry.vmm).is_none() && !Self::snapshot(&entry).state.has_vmm() {
                    let _ = self.update(&entry, |r| r.operation = None);
                }
                Err(AgentError::MigrationFailed(why))
            }
            Err(SendFailed::Refused(why)) => {
                let _ = self.update(&entry, |r| r.operation = None);
                Err(AgentError::MigrationFailed(why))
            }
            Err(SendFailed::Cancelled) => {
                let _ = self.update(&entry, |r| r.operation = None);
                Err(self.cancelled(id, &req.destination, "the switch-over"))
            }
        }
    }

    /// A migration of VM `id` to `destination` cancelled before `when`: said in a `migrating`
    /// event, and the migration request's answer.
    fn cancelled(&self, id: &str, destination: &str, when: &str) -> AgentError {
        let message =
            format!("live migration to {destination} cancelled before {when}: the VM goes on here");
        self.events.emit(
            id,
            EventKind::Migrating,
            Some(Phase::Running),
            message.clone(),
        );
        AgentError::MigrationCancelled(message)
    }

    /// Asks the VM's VMM to migrate into a socket of ours, relays that to `conn`, and returns
    /// the VMM's report once the receiver holds the VM.
    async fn send_vm(
        self: &Arc<Self>,
        entry: &Arc<VmEntry>,
        rec: &VmRecord,
        conn: BufReader<tokio_rustls::client::TlsStream<TcpStream>>,
        req: &MigrateRequest,
        cancel: &Arc<Cancel>,
    ) -> Result<bexar_vmm::migration::MigrationReport, SendFailed> {
        let dir = self.vm_dir(&entry.id);
        // A jailed VMM reaches the socket in its root's writable directory.
        let jail = rec
            .status
            .pid
            .and_then(|pid| super::sandbox::jail_root_of(pid, &dir));
        let (host_path, vmm_path) = match jail {
            Some(root) => (
                root.join(bexar_vmm::launch::files::JAIL_OUT)
                    .join(layout::MIGRATE_SOCKET),
                std::path::Path::new("/")
                    .join(bexar_vmm::launch::files::JAIL_OUT)
                    .join(layout::MIGRATE_SOCKET),
            ),
            None => (
                dir.join(layout::MIGRATE_SOCKET),
                dir.join(layout::MIGRATE_SOCKET),
            ),
        };
        let failed = |what: &str, e: std::io::Error| {
            SendFailed::Refused(format!("{what} {}: {e}", host_path.display()))
        };
        let _ = std::fs::remove_file(&host_path);
        let listener = UnixListener::bind(&host_path).map_err(|e| failed("cannot listen on", e))?;
        {
            use std::os::unix::fs::PermissionsExt;
            // The VMM runs as its own uid; only it and root reach this directory.
            std::fs::set_permissions(&host_path, std::fs::Permissions::from_mode(0o666))
                .map_err(|e| failed("cannot open", e))?;
        }
        let (progress_tx, mut progress_rx) = tokio::sync::watch::channel(None);
        let relay = tokio::spawn(relay_out(listener, conn, progress_tx, cancel.clone()));
        let request = bexar_vmm::control::Request::Migrate {
            to: vmm_path,
            downtime_ms: req.downtime_ms,
            max_rounds: req.max_rounds,
            disks: true,
            max_bandwidth_mib: req.max_bandwidth_mib,
        };
        let exchange = super::vmm_process::exchange(&dir, &request, MIGRATE_TIMEOUT);
        tokio::pin!(exchange);
        // The VMM's progress, as the relay reads it from the stream, goes into the record and
        // the events while the VMM works.
        // A VMM (its guest's, if compromised) could report without end: recorded at most
        // every 100 ms, but every phase change.
        let mut watching = true;
        let mut last: Option<(tokio::time::Instant, bexar_vmm::migration::MigrationPhase)> = None;
        let answered = loop {
            tokio::select! {
                r = &mut exchange => break r,
                changed = progress_rx.changed(), if watching => match changed {
                    Ok(()) => {
                        let p = progress_rx.borrow_and_update().clone();
                        if let Some(p) = p {
                            let due = last.is_none_or(|(at, phase)| {
                                phase != p.phase || at.elapsed() >= Duration::from_millis(100)
                            });
                            if due {
                                last = Some((tokio::time::Instant::now(), p.phase));
                                self.report_progress(entry, &req.destination, p);
                            }
                        }
                    }
                    Err(_) => watching = false,
                },
            }
        };
        let _ = std::fs::remove_file(&host_path);
        match answered {
            Ok((reply, _)) => {
                // The receiver answered the VMM; the relay ends as both sides close.
                let abort = relay.abort_handle();
                if tokio::time::timeout(STEP_TIMEOUT, relay).await.is_err() {
                    abort.abort();
                }
                reply
                    .migration
                    .ok_or_else(|| SendFailed::Refused("the VMM sent no migration report".into()))
            }
            // The VMM answered that the migration failed: the guest goes on here, unless the
            // VMM says it is in doubt (its own error names it so).
            Err(e @ super::vmm_process::VmmProcessError::Refused { .. }) => {
                relay.abort();
                let e = e.to_string();
                Err(if e.contains(IN_DOUBT) {
                    SendFailed::InDoubt
                } else if cancel.asked.load(std::sync::atomic::Ordering::SeqCst)
                    && e.contains(CANCELLED)
                {
                    SendFailed::Cancelled
                } else {
                    SendFailed::Refused(format!("the VM stays here: {e}"))
                })
            }
            // No answer at all (the VMM died, or is still at it): whether it handed the VM
            // over is for its end to say (`settle_migration`, under the operation lock).
            Err(e) => {
                relay.abort();
                Err(SendFailed::NoAnswer(format!(
                    "the VMM did not answer ({e}): the VM is where its VMM's end says"
                )))
            }
        }
    }

    /// Records a progress report of the sending VMM in the VM's operation, and emits it as an
    /// event when a round or the switch-over begins.
    fn report_progress(
        &self,
        entry: &Arc<VmEntry>,
        destination: &str,
        p: bexar_vmm::migration::MigrationProgress,
    ) {
        use bexar_vmm::migration::MigrationPhase;
        let mib = |b: u64| b as f64 / f64::from(1 << 20);
        let message = match p.phase {
            MigrationPhase::Copying => format!(
                "migrating to {destination}: round {} begins, {:.1} MiB to send ({:.1} MiB sent), \
                 {:.0} MiB/s, the guest dirtying {} pages/s, pause expected {:.1} ms{}",
                p.round,
                mib(p.left_bytes),
                mib(p.bytes_sent),
                mib(p.rate_bytes_per_sec),
                p.dirty_pages_per_sec,
                p.expected_blackout_us as f64 / 1e3,
                if p.throttle_pct > 0 {
                    format!(", vCPUs throttled {}%", p.throttle_pct)
                } else {
                    String::new()
                }
            ),
            MigrationPhase::SwitchOver => format!(
                "migrating to {destination}: switch-over after {} rounds, the guest is paused, \
                 {:.1} MiB left",
                p.round,
                mib(p.left_bytes)
            ),
        };
        let updated = self.update(entry, |r| {
            if let Some(op) = r.operation.as_mut().filter(|o| o.kind == Op::Migrate) {
                op.progress = Some(p);
            }
        });
        if updated.is_ok() {
            self.events
                .emit(&entry.id, EventKind::Migrating, None, message);
        }
    }

    /// Cancels the live migration of VM `id` if its switch-over has not begun: the VM goes
    /// on here, and the migration's own request ends with `migration_cancelled`.
    pub async fn cancel_migration(&self, id: &str) -> Result<VmRecord, AgentError> {
        use std::sync::atomic::Ordering;
        let (cancel, rec) = self.migration_under_way(id, "cancel the migration of")?;
        if cancel.switching.load(Ordering::SeqCst) {
            return Err(AgentError::Conflict(FieldError::new(
                "id",
                "the switch-over has begun: too late to cancel",
            )));
        }
        cancel.asked.store(true, Ordering::SeqCst);
        cancel.notify.notify_one();
        Ok(rec)
    }

    /// Has the live migration of VM `id` switch over after the round under way, whatever its
    /// downtime budget (nova's "force complete"): the rest of the round goes without the
    /// bandwidth limit, then the guest pauses for what is left. Asked again, or once the
    /// switch-over has begun, it changes nothing.
    pub async fn complete_migration(&self, id: &str) -> Result<VmRecord, AgentError> {
        use std::sync::atomic::Ordering;
        let (steer, rec) = self.migration_under_way(id, "complete the migration of")?;
        if !steer.complete.swap(true, Ordering::SeqCst) {
            steer.notify.notify_one();
        }
        Ok(rec)
    }

    /// The handle of VM `id`'s migration under way, and its record; none under way is an
    /// illegal transition for `verb`.
    fn migration_under_way(
        &self,
        id: &str,
        verb: &'static str,
    ) -> Result<(Arc<Cancel>, VmRecord), AgentError> {
        let entry = self.entry(id)?;
        let handle = lock(&entry.migration).clone();
        let rec = Self::snapshot(&entry);
        match handle {
            Some(h) => Ok((h, rec)),
            None => Err(super::lifecycle::illegal(&rec, verb)),
        }
    }

    /// Whether this host holds the VM a [`Query`] names.
    fn holds(&self, q: &Query) -> Holds {
        let Ok(entry) = self.entry(&q.query) else {
            return Holds::default();
        };
        let rec = Self::snapshot(&entry);
        if rec.uuid != q.uuid || rec.state == Phase::Deleting {
            return Holds::default();
        }
        // Held on evidence only: its VMM told the sender it holds the VM (recorded before
        // the word went on), or a VMM of it runs here. Still arriving: ask again. Anything
        // else (an arrival that failed and is being removed) is not held.
        let committed = self
            .vm_dir(&q.query)
            .join(layout::INCOMING_COMMITTED)
            .exists();
        let arriving = rec
            .operation
            .as_ref()
            .is_some_and(|o| o.kind == Op::Incoming);
        Holds {
            held: committed || (!arriving && rec.state.has_vmm()),
            arriving: arriving && !committed,
        }
    }

    /// Takes migrations from other hosts' agents on `listener` until the agent ends.
    pub async fn serve_migrations(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("migration listener: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let agent = self.clone();
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                let Some(tls) = agent.migration.clone() else {
                    return;
                };
                let conn = match tokio::time::timeout(STEP_TIMEOUT, tls.acceptor.accept(tcp)).await
                {
                    Ok(Ok(c)) => c,
                    Ok(Err(e)) => {
                        tracing::warn!(%peer, "migration refused: {e}");
                        return;
                    }
                    Err(_) => {
                        tracing::warn!(%peer, "migration refused: the TLS handshake did not finish");
                        return;
                    }
                };
                agent.receive_vm(conn, peer).await;
            });
        }
    }

    /// One incoming migration from an authenticated peer.
    async fn receive_vm(
        self: &Arc<Self>,
        conn: tokio_rustls::server::TlsStream<TcpStream>,
        peer: SocketAddr,
    ) {
        let mut conn = BufReader::new(conn);
        let hello = match read_line(&mut conn).await {
            Ok(line) => serde_json::from_str::<Hello>(&line),
            Err(e) => {
                tracing::warn!(%peer, "migration: {e}");
                return;
            }
        };
        let entry = match hello {
            Err(e) => Err(field("body", e.to_string())),
            Ok(Hello::Query(q)) => {
                self.recovered().await;
                let holds = self.holds(&q);
                tracing::info!(%peer, vm = %q.query, "asked whether it is here: {holds:?}");
                let _ = write_line(conn.get_mut(), &holds).await;
                return;
            }
            Ok(Hello::Prepare(p)) => {
                self.recovered().await;
                self.prepare_incoming(*p).await
            }
        };
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                tracing::info!(%peer, "migration refused: {e}");
                let _ = write_line(conn.get_mut(), &refusal(&e)).await;
                return;
            }
        };
        let id = entry.id.clone();
        let op = entry.op.lock().await;
        let socket = self.vm_dir(&id).join(layout::INCOMING_SOCKET);
        let committed = self.vm_dir(&id).join(layout::INCOMING_COMMITTED);
        let relay = tokio::spawn(async move {
            use bexar_vmm::migration::SYNCED;
            // The VMM binds its socket before anything else it does.
            let t = tokio::time::Instant::now();
            let mut vmm = loop {
                match UnixStream::connect(&socket).await {
                    Ok(s) => break s,
                    Err(_) if t.elapsed() < STEP_TIMEOUT => {
                        tokio::time::sleep(Duration::from_millis(2)).await
                    }
                    Err(e) => return Err(e),
                }
            };
            write_line(
                conn.get_mut(),
                &Prepared {
                    ok: true,
                    ..Default::default()
                },
            )
            .await?;
            // Nothing comes before our answer; anything buffered is the stream's all the same.
            let early = conn.buffer().to_vec();
            vmm.write_all(&early).await?;
            let (mut conn_r, mut conn_w) = tokio::io::split(conn.into_inner());
            let (mut vmm_r, mut vmm_w) = vmm.into_split();
            // However the sender's side ends (a clean end, or a broken connection), the VMM
            // sees its stream end at once: else it would wait out its read timeout while this
            // waits for its answer.
            let stream = async {
                let copied = tokio::io::copy(&mut conn_r, &mut vmm_w).await;
                let _ = vmm_w.shutdown().await;
                copied.map(|_| ())
            };
            // The VMM's answer: once it says it holds the VM, the VM is this host's (the
            // sender lets its copy go on that byte), which is on record before it passes.
            let answer = async {
                let mut buf = [0u8; 4096];
                let mut answered = false;
                loop {
                    let n = vmm_r.read(&mut buf).await?;
                    if n == 0 {
                        return conn_w.shutdown().await;
                    }
                    // Its answer is the first byte that is not a sync's.
                    if !answered {
                        if let Some(b) = buf[..n].iter().find(|b| **b != SYNCED) {
                            answered = true;
                            if *b == b'R' {
                                mark_committed(committed.clone()).await?;
                            }
                        }
                    }
                    conn_w.write_all(&buf[..n]).await?;
                    conn_w.flush().await?;
                }
            };
            // Both to their end: the answer is read (and its commit recorded) even when the
            // other direction broke first.
            let (s, a) = tokio::join!(stream, answer);
            s.and(a)
        });
        let abort = relay.abort_handle();
        let launched = self.launch(&entry, Op::Incoming).await;
        // The VM runs here: the relay only carries the VMMs' last bytes, and the VM is free
        // for other operations. If it does not, the lock is kept until its copy is gone.
        let op = if launched.is_ok() {
            drop(op);
            None
        } else {
            Some(op)
        };
        let relayed = match tokio::time::timeout(STEP_TIMEOUT, relay).await {
            Ok(r) => format!("{r:?}"),
            Err(_) => {
                abort.abort();
                "the relay did not end".to_owned()
            }
        };
        let committed = self.vm_dir(&id).join(layout::INCOMING_COMMITTED);
        match launched {
            Ok(_) => {
                // Kept with the VM (a question about it after this is answered "held").
                if !committed.exists() {
                    let _ = mark_committed(committed).await;
                }
                tracing::info!(vm = %id, %peer, "migrated here");
            }
            Err(e) if committed.exists() => {
                // Its VMM told the sender it holds the VM, then ended: the VM is this host's
                // (the sender let its copy go), and its guest died here.
                let _op = op;
                tracing::warn!(vm = %id, %peer, "the VM arrived and its VMM ended: {e}");
                let reason = format!("its VMM ended after it took the VM over: {e}");
                let _ = self.update(&entry, |r| {
                    r.state = Phase::Failed;
                    r.operation = None;
                    r.status.exit_reason = Some(reason);
                });
            }
            Err(e) => {
                let _op = op;
                tracing::warn!(vm = %id, %peer, "migration did not arrive: {e} ({relayed})");
                let _ = self.update(&entry, |r| {
                    r.state = Phase::Deleting;
                    r.desired = Desired::Stopped;
                });
                if let Err(e) = self.finish_delete(&entry).await {
                    tracing::error!(vm = %id, "cannot remove a failed incoming VM: {e}");
                }
            }
        }
    }

    /// Makes the VM of `p` here, stopped and `incoming`, as the sender has it (see the module's
    /// description). On an error nothing is left.
    async fn prepare_incoming(self: &Arc<Self>, p: Prepare) -> Result<Arc<VmEntry>, AgentError> {
        let src = p.record;
        let id = src.id.clone();
        // Checked before anything is made from it: the id names the directory written below.
        src.spec.validate()?;
        if self.entry(&id).is_ok() {
            return Err(AgentError::Exists(id));
        }
        // The guest keeps using what its CPU showed it: this host must have all of it.
        if let (Some(there), Some(here)) = (&p.cpu, guest_cpu(&src.spec)) {
            let missing = there.missing_in(&here);
            if !missing.is_empty() {
                let n = missing.len();
                return Err(AgentError::Conflict(FieldError::new(
                    "spec.cpu_template",
                    format!(
                        "this host's CPU lacks {n} feature(s) the guest was shown ({}{}): \
                         VMs that move between these hosts need a template both offer, such \
                         as x86-64-v2",
                        missing[..n.min(6)].join(", "),
                        if n > 6 { ", ..." } else { "" }
                    ),
                )));
            }
        }
        let mut spec = src.spec.clone();
        spec.uuid = Some(src.uuid);
        for (n, was) in spec.nics.iter_mut().zip(&src.nics) {
            if n.segment.is_some() {
                n.mac = Some(was.mac.clone());
                n.ipv4 = was.ipv4;
                n.ipv6 = was.ipv6;
            }
        }
        // Overlays are made below as a create makes them, each on this host's image with the
        // sender's base content (by id if it matches, else any with that hash); checked before
        // any file is made.
        for (i, d) in spec.disks.iter_mut().enumerate() {
            let Some(image) = &d.image else {
                continue;
            };
            let want = p.image_sha256.get(i).cloned().flatten().unwrap_or_default();
            let mine = match self.images.get(image) {
                Ok(img) if img.sha256 == want => Some(img),
                _ => self.images.list().into_iter().find(|m| m.sha256 == want),
            };
            let Some(mine) = mine else {
                return Err(AgentError::Conflict(FieldError::new(
                    format!("spec.disks[{i}].image"),
                    format!(
                        "this host has no image with the content of {image:?} (sha256 {want}): \
                         register the same base image here first"
                    ),
                )));
            };
            d.image = Some(mine.id);
        }
        let dir = self.vm_dir(&id);
        let made_dir = !dir.exists();
        let cleanup = |dir: &std::path::Path| {
            if made_dir && self.entry(&id).is_err() {
                let _ = std::fs::remove_dir_all(dir);
            }
        };
        // The copied disks land in files of the VM's directory, which go with it.
        for (i, d) in spec.disks.iter_mut().enumerate() {
            if d.image.is_some() {
                continue;
            }
            let Some(Some(size)) = p.disk_sizes.get(i) else {
                continue;
            };
            let path = dir.join(format!("disk{i}.raw"));
            // A file already there (a directory left by a VM of this id) is never reused.
            let made = std::fs::create_dir_all(&dir)
                .and_then(|()| {
                    std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(&path)
                })
                .and_then(|f| f.set_len(*size));
            if let Err(e) = made {
                cleanup(&dir);
                return Err(AgentError::Store(super::StoreError::Io(
                    bexar_util::fs::FsError {
                        what: "create",
                        path,
                        err: e,
                    },
                )));
            }
            d.path = Some(path);
            d.format = Some(bexar_devices::block::DiskFormat::Raw);
        }
        let created = self.create_record(spec, false);
        match created {
            Ok((_, true)) => {}
            Ok((_, false)) => return Err(AgentError::Exists(id)),
            Err(e) => {
                cleanup(&dir);
                return Err(e);
            }
        }
        let entry = self.entry(&id)?;
        // An overlay made here is as big as the image under it or the spec's size, as the
        // sender's was; a disk that is not could not take the sender's blocks.
        let made = Self::snapshot(&entry);
        for (i, (want, have)) in p.disk_sizes.iter().zip(&made.disks).enumerate() {
            if want.is_some_and(|w| w != have.size) {
                let _ = self.delete(&id).await;
                return Err(AgentError::Conflict(FieldError::new(
                    format!("spec.disks[{i}]"),
                    format!(
                        "{} bytes here, {} on the sending host",
                        have.size,
                        want.unwrap_or_default()
                    ),
                )));
            }
        }
        let rec = self.update(&entry, |r| {
            r.metadata = src.metadata.clone();
            r.desired = Desired::Running;
            r.operation = Some(Operation {
                kind: Op::Incoming,
                started_ms: now_ms(),
                progress: None,
                destination: None,
                timeout_ms: None,
            });
        });
        let rec = match rec {
            Ok(r) => r,
            Err(e) => {
                let _ = self.delete(&id).await;
                return Err(e);
            }
        };
        if rec.nics.iter().any(|n| n.segment.is_some()) {
            if let Err(e) = self.wire_nics(&rec).await {
                let _ = self.delete(&id).await;
                return Err(e);
            }
        }
        Ok(entry)
    }
}
