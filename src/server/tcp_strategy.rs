//! Direct TCP traversal strategies as a sans-IO state machine. Inputs: packets the server's
//! userspace TCP (smoltcp) emits, packets arriving from the wire for this attempt's server port,
//! and timer ticks with an explicit `now`. Outputs: indications for the trigger, packets for the
//! TUN, packets for smoltcp. The smoltcp socket always talks to a *virtual* camera address; the
//! wire carries the camera's NAT mapping; [`crate::wire::rewrite`] translates between them.
//!
//! * `patent-syn` (claims 2, 9): the SYN smoltcp emits is carried in the indication and injected
//!   by the trigger towards the camera; the camera's SYN-ACK, arriving from its NAT's public
//!   endpoint, completes the handshake. Fails on Linux conntrack NATs (the SYN-ACK is the first
//!   packet of the flow the NAT sees: INVALID), works with no NAT in between.
//! * `reverse-syn`: the trigger injects a SYN *from* the camera's address:port to the server;
//!   the NAT maps it and forwards it; the server swallows it (no SYN-ACK, no RST), learns the
//!   mapping and opens with its own SYN to it (simultaneous-open on the NAT, an ordinary
//!   passive open on the camera). Works where the NAT does not track TCP windows strictly.
//! * `steered-resync`: direct TCP through a strict, window-tracking conntrack NAT (the lab's
//!   measured sequence, `docs/architecture.md`): (1) trigger: reverse SYN camera→server, seq T;
//!   the server learns the mapping and the hop count; (2) server: a *steered* SYN-ACK (seq S =
//!   smoltcp's ISN, ack T+1) that conntrack sees but the camera never gets (TTL expiring at the
//!   NAT, or a TCP-MD5 option the camera drops); (3) trigger: the patent's SYN server→camera with
//!   seq S; the camera's SYN-ACK (seq C) is now translated to the server and *held*; (4) trigger:
//!   reverse SYN seq C, then a steered SYN-ACK acking C+1: conntrack resyncs to S and C; (5) the
//!   held SYN-ACK goes to smoltcp, which completes the handshake; nothing of smoltcp's connection
//!   leaves the server before that.
//!
//! **Timed steps** ([`Pipelining`], connections a client waits for): a steered packet only has to
//! reach the NAT *after* the trigger's packet before it, and both leave the server over the same
//! WAN path, the trigger's one a LAN hop and the trigger's processing longer. So instead of
//! waiting a WAN round trip for the trigger's packet to come back, the server sends the steered
//! packet `lead` after the indication: step 4 always (saves a round trip), steps 2+3 when the
//! mapping can be predicted (the site's NAT kept the camera's port last time: saves another).
//! Whichever comes first, the timer or the trigger's packet, drives the step, so on a path
//! shorter than `lead` nothing changes. A late trigger packet still gets its steered answer
//! (conntrack then resyncs late and smoltcp retransmits); a wrong prediction or a steered packet
//! that overtook step 1 fails the attempt at once, and the caller retries step by step.

use crate::wire::rewrite::{self, End};
use rand::Rng;
use serde::{Deserialize, Serialize};
use smoltcp::wire::{IpProtocol, Ipv4Packet, TcpPacket, TcpSeqNumber};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    PatentSyn,
    ReverseSyn,
    SteeredResync(Steering),
}

/// How a steered packet is kept from the camera while conntrack still sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Steering {
    /// IP TTL expiring at the NAT: derived from the arriving TTL of step 1 (both ends are TUNs,
    /// so a packet the server writes needs `64 - ttl_seen - 1`), plus a per-site `adjust`
    /// calibrated in the site profile.
    Ttl { adjust: i8 },
    /// TCP-MD5 option (kind 19) with a random digest: conntrack passes it, a camera without a key
    /// drops the segment.
    Md5,
}

impl Strategy {
    /// The strategies a site profile measures first, cheapest first.
    pub const BASIC: [Strategy; 4] = [
        Strategy::PatentSyn,
        Strategy::ReverseSyn,
        Strategy::SteeredResync(Steering::Ttl { adjust: 0 }),
        Strategy::SteeredResync(Steering::Md5),
    ];

    pub fn name(self) -> &'static str {
        match self {
            Strategy::PatentSyn => "patent-syn",
            Strategy::ReverseSyn => "reverse-syn",
            Strategy::SteeredResync(_) => "steered-resync",
        }
    }

    pub fn steering(self) -> Option<String> {
        match self {
            Strategy::SteeredResync(Steering::Ttl { adjust: 0 }) => Some("ttl".into()),
            Strategy::SteeredResync(Steering::Ttl { adjust }) => Some(format!("ttl{adjust:+}")),
            Strategy::SteeredResync(Steering::Md5) => Some("md5".into()),
            _ => None,
        }
    }

    /// `patent-syn`, `reverse-syn`, `steered-resync/ttl`, `steered-resync/ttl-1`, `steered-resync/md5`.
    pub fn label(self) -> String {
        match self.steering() {
            Some(st) => format!("{}/{st}", self.name()),
            None => self.name().to_string(),
        }
    }

    pub fn from_label(s: &str) -> Option<Strategy> {
        match s {
            "patent-syn" => Some(Strategy::PatentSyn),
            "reverse-syn" => Some(Strategy::ReverseSyn),
            "steered-resync/md5" => Some(Strategy::SteeredResync(Steering::Md5)),
            "steered-resync/ttl" => Some(Strategy::SteeredResync(Steering::Ttl { adjust: 0 })),
            other => {
                let adj = other.strip_prefix("steered-resync/ttl")?;
                Some(Strategy::SteeredResync(Steering::Ttl { adjust: adj.parse().ok()? }))
            }
        }
    }
}

/// What a site's steered connections showed, for predicting the next one's step 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SteerHint {
    /// The NAT mapped the camera's (or probe's) port to the same public port, last time.
    pub port_preserved: bool,
    /// The TTL steering strategy that last worked, and its TTL.
    pub ttl: Option<(Strategy, u8)>,
}

impl SteerHint {
    /// `self` updated with an established steered-resync attempt whose step 1 arrived (not
    /// predicted); `None` if the attempt teaches nothing.
    pub fn learn(self, a: &Attempt) -> Option<SteerHint> {
        if !matches!(a.strategy, Strategy::SteeredResync(_)) || a.state != State::Established || a.predicted_early {
            return None;
        }
        let public = a.public?;
        let ttl = match (a.strategy, a.steer_ttl) {
            (Strategy::SteeredResync(Steering::Ttl { .. }), Some(ttl)) => Some((a.strategy, ttl)),
            _ => self.ttl,
        };
        // Predictions use the control link's address: a NAT that maps elsewhere is not predictable.
        let same_ip = a.nat_ip.is_none_or(|ip| ip == *public.ip());
        Some(SteerHint { port_preserved: same_ip && public.port() == a.camera.port(), ttl })
    }

    /// Step 1's expected mapping for `camera` behind `nat_ip` with `strategy`: only where the NAT
    /// kept ports, and for TTL steering only with the TTL this same strategy used.
    pub fn predict(&self, strategy: Strategy, nat_ip: Ipv4Addr, camera: SocketAddrV4) -> Option<Prediction> {
        if !self.port_preserved {
            return None;
        }
        let steer_ttl = match strategy {
            Strategy::SteeredResync(Steering::Ttl { .. }) => Some(self.ttl.filter(|(s, _)| *s == strategy)?.1),
            Strategy::SteeredResync(Steering::Md5) => None,
            _ => return None,
        };
        Some(Prediction { public: SocketAddrV4::new(nat_ip, camera.port()), steer_ttl })
    }
}

/// A trigger packet is re-sent at most this often, and at most `MAX_INDICATIONS` times.
pub const REINDICATE_AFTER: Duration = Duration::from_secs(1);
pub const MAX_INDICATIONS: u32 = 3;

/// Once a direct connection is up and smoltcp has sent its first data: while nothing comes back
/// from the camera, steered-resync sends step 4's steered SYN-ACK again, with that data behind
/// it (at most `RESTEER_MAX` times: after `RESTEER_FIRST_RTTS` round trips of the site, at least
/// `RESTEER_FIRST_MIN`, at most and where the round trip is unknown `REINDICATE_AFTER`; then
/// after 2 s), and the connection fails once the silence has lasted
/// `UNANSWERED_LIMIT` and smoltcp has sent that data `UNANSWERED_SENDS` times (so a lossy path
/// with a long retransmission timeout is not mistaken for a dead one), or after
/// `UNANSWERED_HARD_LIMIT` in any case.
pub const RESTEER_MAX: u32 = 2;
/// The first repeat of step 4 comes after this many of the site's round trips: the camera's
/// stack answers data at once, so silence for that long means the data was dropped. Why not
/// wait a second: the server's own kernel may reorder step 4's steered SYN-ACK and the data
/// behind it (two CPUs), the data then reaches the NAT first and conntrack drops it, and
/// smoltcp would send it again only after its retransmission timeout (at least 1 s). In the
/// bench lab without delay, under load, 11 of 800 connections waited that second for their
/// first byte. A repeat on an answer that was merely slow costs two steered packets (conntrack
/// in sync ignores them) and a duplicate the camera discards.
pub const RESTEER_FIRST_RTTS: u32 = 4;
pub const RESTEER_FIRST_MIN: Duration = Duration::from_millis(20);
pub const UNANSWERED_LIMIT: Duration = Duration::from_secs(5);
pub const UNANSWERED_SENDS: u32 = 3;
pub const UNANSWERED_HARD_LIMIT: Duration = Duration::from_secs(30);

/// How long after an indication a timed steered packet leaves the server. The indicated packet
/// travels the same WAN path plus the trigger's LAN hop and processing (≈ 1 ms on an idle
/// trigger); the lead is the margin for that. Each timed step costs `lead` instead of a WAN round
/// trip, so it pays wherever the round trip is longer than this.
pub const STEER_LEAD: Duration = Duration::from_millis(8);

/// Whether timed steps can save time at a site whose WAN round trip is `rtt`: only where the
/// indicated packet comes back later than the lead. On a shorter path the trigger's packet
/// drives every step anyway, and the timer could only win when the trigger is slow (a busy
/// host), sending a steered packet before the mapping exists and failing the attempt.
pub fn timing_pays(rtt: Option<Duration>) -> bool {
    rtt.is_some_and(|r| r > STEER_LEAD)
}

/// Timed steered-resync steps (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pipelining {
    pub lead: Duration,
    /// Step 1's expected outcome: steps 2+3 go out `lead` after step 1's indication.
    pub predicted: Option<Prediction>,
}

/// The mapping and steering TTL step 1 is expected to produce (the site's NAT kept the camera's
/// port, and the path's hop count, at its last steered connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prediction {
    pub public: SocketAddrV4,
    /// Required for TTL steering, unused for MD5.
    pub steer_ttl: Option<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Out {
    /// Ask the trigger to inject `pd1` (a TCP header) towards the camera (`to_server == false`)
    /// or from the camera towards the server (`to_server == true`).
    Indicate { to_server: bool, pd1: Vec<u8> },
    /// Call `connect()` on the smoltcp socket now (towards the virtual address).
    Connect,
    /// Write to the TUN.
    ToWire(Vec<u8>),
    /// Feed to smoltcp.
    ToStack(Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// steered-resync: waiting for smoltcp's SYN, whose ISN S the sequence is built on.
    AwaitIsn,
    /// reverse-syn, steered-resync step 1: waiting for the trigger's reverse SYN to arrive
    /// through the NAT.
    AwaitReverseSyn,
    /// steered-resync step 4: the camera's SYN-ACK is held; waiting for the resync SYN.
    AwaitResync,
    /// Waiting for the camera's SYN-ACK.
    AwaitSynAck,
    Established,
    Failed(String),
}

pub struct Attempt {
    pub strategy: Strategy,
    /// public_ip:P, a fresh port per attempt.
    pub server: SocketAddrV4,
    /// The camera's private address and port (what the trigger targets).
    pub camera: SocketAddrV4,
    /// Where smoltcp thinks the camera is.
    pub virt: SocketAddrV4,
    /// The camera's NAT mapping, once learned.
    pub public: Option<SocketAddrV4>,
    pub state: State,
    pub started: Instant,
    pub established_at: Option<Instant>,
    pub indications: u32,
    /// Indications for the current step (each step is retried on its own budget).
    step_tries: u32,
    step_state: Option<State>,
    step_timeout: Duration,
    last_indication: Option<Instant>,
    /// The trigger packet to repeat if it (or the camera's answer) is lost.
    last_pd1: Option<(bool, Vec<u8>)>,
    deadline: Instant,
    /// A SYN-ACK arrived from a private address: the NAT leaked it untranslated.
    leaked: bool,
    /// The site NAT's public address (from the trigger's control link): before the mapping is
    /// learned, packets from any other address are ignored.
    pub nat_ip: Option<Ipv4Addr>,
    /// steered-resync: smoltcp's ISN and SYN segment, the TTL for steered packets, the camera's
    /// held SYN-ACK and its ISN.
    isn: Option<u32>,
    syn_pd1: Option<Vec<u8>>,
    steer_ttl: Option<u8>,
    held_synack: Option<Vec<u8>>,
    camera_isn: Option<u32>,
    /// The last steered packet, re-sent with a retried step.
    last_steered: Option<Vec<u8>>,
    /// Sequential waits for a packet through the NAT (each one WAN round trip).
    pub round_trips: u32,
    /// The shortest wait from an indication to the packet it caused arriving through the NAT: the
    /// WAN round trip (plus the trigger's processing), which sizes the connection's window.
    pub rtt: Option<Duration>,
    pipelining: Option<Pipelining>,
    /// When the pending timed step is due (steps 2+3 in `AwaitReverseSyn`, step 4 in `AwaitResync`).
    timed_at: Option<Instant>,
    /// steered-resync: the reverse SYN's seq T (step 1).
    reverse_seq: Option<u32>,
    /// Steps 2+3 went out on the prediction, and whether step 1 has arrived since.
    predicted_early: bool,
    step1_seen: bool,
    /// Step 4's steered SYN-ACK went out on the timer, and whether the resync SYN has arrived
    /// since.
    resync_early: bool,
    resync_seen: bool,
    /// steered-resync, once established: when smoltcp first sent data, whether any segment
    /// from the camera has arrived since the handshake (the camera's stack acknowledges data at
    /// once, so silence means the NAT drops its segments: step 4 did not take), and how often
    /// step 4's steered SYN-ACK was sent again for that.
    stack_data_at: Option<Instant>,
    /// How often smoltcp has sent its first data (the segment at ISN+1).
    first_data_sends: u32,
    /// smoltcp's first data as it last went on the wire, until the camera answers: sent again
    /// right behind step 4's steered SYN-ACK when that is sent again (a resync SYN after the
    /// timed step 4, silence). Why: if the resync SYN was late, conntrack dropped it while out
    /// of sync, and smoltcp would retransmit it only after its retransmission timeout (at least
    /// 1 s; seen as 1.85–2.1 s to the first byte through the lab's 20 ms WAN when the trigger
    /// injected the resync SYN 40 ms later than usual). The server cannot tell a late resync
    /// SYN from one on time, which comes back before the camera's answer to the data too: then
    /// the camera gets that segment twice and discards the copy.
    first_data_copy: Option<Vec<u8>>,
    camera_acked: bool,
    resteered: u32,
    /// The attempt failed because of the timing or the prediction (a step-by-step attempt may
    /// still work).
    timing_failure: bool,
    rng: rand::rngs::StdRng,
}

fn tcp_of(pkt: &[u8]) -> Option<(SocketAddrV4, SocketAddrV4, TcpPacket<&[u8]>)> {
    let ip = Ipv4Packet::new_checked(pkt).ok()?;
    if ip.next_header() != IpProtocol::Tcp {
        return None;
    }
    let src = rewrite::endpoint(pkt, End::Src).ok()?;
    let dst = rewrite::endpoint(pkt, End::Dst).ok()?;
    let hl = ip.header_len() as usize;
    let t = TcpPacket::new_checked(&pkt[hl..ip.total_len() as usize]).ok()?;
    Some((src, dst, t))
}

/// TCP options of a typical Linux SYN (MSS 1460, SACK permitted, window scale 7): what a
/// camera's own SYN would likely carry.
pub const LINUX_SYN_OPTIONS: [u8; 12] = [2, 4, 0x05, 0xb4, 1, 1, 4, 2, 1, 3, 3, 7];

/// A SYN segment with `options` (padded to 4 bytes), checksum left for the trigger to fill.
pub fn syn_segment_with(src_port: u16, dst_port: u16, seq: u32, options: &[u8]) -> Vec<u8> {
    let opt_len = options.len().min(40).div_ceil(4) * 4;
    let hl = 20 + opt_len;
    let mut seg = vec![0u8; hl];
    {
        let mut t = TcpPacket::new_unchecked(&mut seg[..]);
        t.set_src_port(src_port);
        t.set_dst_port(dst_port);
        t.set_seq_number(TcpSeqNumber(seq as i32));
        t.set_header_len(hl as u8);
        t.clear_flags();
        t.set_syn(true);
        t.set_window_len(64240);
    }
    let n = options.len().min(40);
    seg[20..20 + n].copy_from_slice(&options[..n]);
    for b in &mut seg[20 + n..] {
        *b = 1; // NOP padding
    }
    seg
}

/// A SYN as a Linux camera would send it (see [`LINUX_SYN_OPTIONS`]).
pub fn syn_segment(src_port: u16, dst_port: u16, seq: u32) -> Vec<u8> {
    syn_segment_with(src_port, dst_port, seq, &LINUX_SYN_OPTIONS)
}

/// The options bytes of a TCP segment (empty if malformed).
pub fn tcp_options(seg: &[u8]) -> &[u8] {
    let hl = seg.get(12).map(|b| ((b >> 4) as usize) * 4).unwrap_or(0);
    if hl < 20 || hl > seg.len() {
        return &[];
    }
    &seg[20..hl]
}

impl Attempt {
    pub fn new(
        strategy: Strategy,
        server: SocketAddrV4,
        camera: SocketAddrV4,
        virt: SocketAddrV4,
        now: Instant,
        timeout: Duration,
    ) -> Self {
        Attempt {
            strategy,
            server,
            camera,
            virt,
            public: None,
            state: match strategy {
                Strategy::PatentSyn => State::AwaitSynAck,
                Strategy::ReverseSyn => State::AwaitReverseSyn,
                Strategy::SteeredResync(_) => State::AwaitIsn,
            },
            started: now,
            established_at: None,
            indications: 0,
            step_tries: 0,
            step_state: None,
            step_timeout: timeout,
            last_indication: None,
            last_pd1: None,
            deadline: now + timeout,
            leaked: false,
            nat_ip: None,
            isn: None,
            syn_pd1: None,
            steer_ttl: None,
            held_synack: None,
            camera_isn: None,
            last_steered: None,
            round_trips: 0,
            rtt: None,
            pipelining: None,
            timed_at: None,
            reverse_seq: None,
            predicted_early: false,
            step1_seen: false,
            resync_early: false,
            resync_seen: false,
            camera_acked: false,
            stack_data_at: None,
            first_data_sends: 0,
            first_data_copy: None,
            resteered: 0,
            timing_failure: false,
            rng: rand::SeedableRng::from_os_rng(),
        }
    }

    /// Time steered-resync's steps instead of waiting for round trips (before `start`).
    pub fn with_pipelining(mut self, p: Pipelining) -> Self {
        if matches!(self.strategy, Strategy::SteeredResync(_)) {
            self.pipelining = Some(p);
        }
        self
    }

    /// Steps sent on a timer instead of after a round trip (0, 1 or 2).
    pub fn timed_steps(&self) -> u32 {
        self.predicted_early as u32 + self.resync_early as u32
    }

    /// Whether the attempt failed because of the timing or the prediction (retry step by step).
    pub fn failed_by_timing(&self) -> bool {
        self.timing_failure && self.failed().is_some()
    }

    fn fail_timing(&mut self, why: String) {
        self.timing_failure = true;
        self.state = State::Failed(why);
    }

    /// TTL the steered packets use (steered-resync/ttl, once step 1 arrived).
    pub fn steer_ttl(&self) -> Option<u8> {
        self.steer_ttl
    }

    /// A SYN-ACK from server:P to the mapping that conntrack sees and the camera must not.
    fn steered_synack(&mut self, ack: u32) -> Option<Vec<u8>> {
        let public = self.public?;
        let seq = self.isn?;
        let md5 = matches!(self.strategy, Strategy::SteeredResync(Steering::Md5));
        // Conntrack tracks window scaling from the SYN/SYN-ACK options it sees: the steered
        // SYN-ACK stands for the server's side, so it carries smoltcp's own SYN options (window
        // scale, MSS); otherwise conntrack would judge scaled windows as unscaled and drop or
        // reset segments of a fast transfer.
        let own: Vec<u8> = self.syn_pd1.as_deref().map(|p| tcp_options(p).to_vec()).unwrap_or_default();
        let md5_len = if md5 { 20 } else { 0 };
        let own_len = own.len().min(40 - md5_len).div_ceil(4) * 4;
        let hl = 20 + md5_len + own_len;
        let mut seg = vec![1u8; hl]; // NOP-filled options area
        seg[..20].iter_mut().for_each(|b| *b = 0);
        {
            let mut t = TcpPacket::new_unchecked(&mut seg[..]);
            t.set_src_port(self.server.port());
            t.set_dst_port(public.port());
            t.set_seq_number(TcpSeqNumber(seq as i32));
            t.set_ack_number(TcpSeqNumber(ack as i32));
            t.set_header_len(hl as u8);
            t.clear_flags();
            t.set_syn(true);
            t.set_ack(true);
            t.set_window_len(64240);
        }
        if md5 {
            // kind 19, length 18, a random digest no camera can verify; 2 bytes of NOP padding.
            seg[20] = 19;
            seg[21] = 18;
            self.rng.fill(&mut seg[22..38]);
        }
        let n = own.len().min(own_len);
        seg[20 + md5_len..20 + md5_len + n].copy_from_slice(&own[..n]);
        let a = crate::wire::trigger_packet::Addressing {
            proto: crate::catalog::Proto::Tcp,
            src: *self.server.ip(),
            src_port: self.server.port(),
            dst: *public.ip(),
            dst_port: public.port(),
        };
        let mut pkt = crate::wire::trigger_packet::build(&a, &seg, self.rng.random()).ok()?;
        if let Some(ttl) = self.steer_ttl.filter(|_| !md5) {
            let mut ip = Ipv4Packet::new_unchecked(&mut pkt[..]);
            ip.set_hop_limit(ttl);
            ip.fill_checksum();
        }
        self.last_steered = Some(pkt.clone());
        Some(pkt)
    }

    fn indicate(&mut self, now: Instant, to_server: bool, pd1: Vec<u8>) -> Out {
        if self.step_state.as_ref() != Some(&self.state) {
            // A new step: its own retry and time budget.
            self.step_state = Some(self.state.clone());
            self.step_tries = 0;
            self.deadline = self.deadline.max(now + self.step_timeout);
        }
        self.step_tries += 1;
        self.indications += 1;
        self.last_indication = Some(now);
        self.last_pd1 = Some((to_server, pd1.clone()));
        Out::Indicate { to_server, pd1 }
    }

    /// Begin: reverse-syn asks for the reverse SYN; patent-syn lets smoltcp connect (its SYN
    /// comes back through [`Attempt::from_stack`]).
    pub fn start(&mut self, now: Instant, rng: &mut impl Rng) -> Vec<Out> {
        match self.strategy {
            Strategy::PatentSyn | Strategy::SteeredResync(_) => vec![Out::Connect],
            Strategy::ReverseSyn => {
                let seg = syn_segment(self.camera.port(), self.server.port(), rng.random());
                vec![self.indicate(now, true, seg)]
            }
        }
    }

    /// A packet smoltcp wants to send (towards `virt`).
    pub fn from_stack(&mut self, mut pkt: Vec<u8>, now: Instant) -> Vec<Out> {
        let Some((_, dst, t)) = tcp_of(&pkt) else {
            return vec![];
        };
        if dst != self.virt {
            return vec![];
        }
        let is_syn = t.syn() && !t.ack();
        if is_syn && self.isn.is_none() {
            self.isn = Some(t.seq_number().0 as u32);
        }
        // smoltcp's first data starts at ISN+1 (its keepalive probes sit one below: not data).
        let is_first_data = !t.payload().is_empty() && Some(t.seq_number().0 as u32) == self.isn.map(|s| s.wrapping_add(1));
        if self.state == State::Established && is_first_data {
            self.stack_data_at.get_or_insert(now);
            self.first_data_sends += 1;
        }
        if t.rst() && self.established_at.is_some() && matches!(self.state, State::Failed(_)) {
            // The connection failed after its handshake: smoltcp's reset still goes to the
            // camera, which would otherwise keep the connection (and retransmit into it).
            return match self.public {
                Some(public) if rewrite::rewrite(&mut pkt, End::Dst, public).is_ok() => vec![Out::ToWire(pkt)],
                _ => vec![],
            };
        }
        let hl = Ipv4Packet::new_unchecked(&pkt[..]).header_len() as usize;
        match (&self.state, self.strategy) {
            (State::AwaitIsn, Strategy::SteeredResync(_)) if is_syn => {
                // Step 1: smoltcp's ISN is S (recorded above); ask for the reverse SYN (seq T).
                self.syn_pd1 = Some(pkt[hl..].to_vec());
                self.state = State::AwaitReverseSyn;
                let t: u32 = self.rng.random();
                self.reverse_seq = Some(t);
                if let (Some(lead), Some(_)) = (self.pipelining.map(|p| p.lead), self.usable_prediction()) {
                    self.timed_at = Some(now + lead);
                }
                let seg = syn_segment(self.camera.port(), self.server.port(), t);
                vec![self.indicate(now, true, seg)]
            }
            (_, Strategy::SteeredResync(_)) if self.state != State::Established => vec![], // smoltcp's SYN retransmissions
            (State::AwaitSynAck, Strategy::PatentSyn) if is_syn => {
                // smoltcp's SYN (and its retransmissions) become the trigger packet.
                if self.indications < MAX_INDICATIONS {
                    let seg = pkt[hl..].to_vec();
                    vec![self.indicate(now, false, seg)]
                } else {
                    vec![]
                }
            }
            (State::AwaitSynAck, Strategy::ReverseSyn) | (State::Established, _) => {
                let Some(public) = self.public else {
                    return vec![];
                };
                if rewrite::rewrite(&mut pkt, End::Dst, public).is_err() {
                    return vec![];
                }
                if is_first_data && !self.camera_acked && self.retries_synack() {
                    self.first_data_copy = Some(pkt.clone());
                }
                vec![Out::ToWire(pkt)]
            }
            _ => vec![],
        }
    }

    /// A packet from the wire addressed to `server`.
    pub fn from_wire(&mut self, mut pkt: Vec<u8>, now: Instant) -> Vec<Out> {
        let Some((src, dst, t)) = tcp_of(&pkt) else {
            return vec![];
        };
        if dst != self.server {
            return vec![];
        }
        let private = super::udp_mapping::is_private(*src.ip());
        if self.public.is_none() && !private && self.nat_ip.is_some_and(|ip| ip != *src.ip()) {
            return vec![]; // not from the site's NAT: someone guessed the server port
        }
        let (syn, ack, rst) = (t.syn(), t.ack(), t.rst());
        let (seq, ackn) = (t.seq_number().0 as u32, t.ack_number().0 as u32);
        if let Strategy::SteeredResync(steering) = self.strategy {
            if self.state != State::Established {
                let ttl = Ipv4Packet::new_unchecked(&pkt[..]).hop_limit();
                return self.steered_from_wire(src, private, (syn, ack, rst), (seq, ackn), ttl, steering, pkt, now);
            }
        }
        match self.state {
            State::AwaitIsn | State::AwaitResync => vec![],
            State::AwaitReverseSyn => {
                if syn && !ack && src.port() != 0 {
                    if private {
                        self.leaked = true;
                        return vec![];
                    }
                    // The reverse SYN came through the NAT: swallow it, learn the mapping.
                    self.public = Some(src);
                    self.waited(now);
                    self.state = State::AwaitSynAck;
                    return vec![Out::Connect];
                }
                vec![]
            }
            State::AwaitSynAck => {
                if private {
                    if syn && ack {
                        self.leaked = true;
                    }
                    return vec![];
                }
                if let Some(p) = self.public {
                    if p != src {
                        return vec![];
                    }
                }
                if rst {
                    self.state = State::Failed(format!("camera (via {src}) answered with RST"));
                    return vec![];
                }
                if syn && ack {
                    self.public = Some(src);
                    self.waited(now);
                    self.state = State::Established;
                    self.established_at = Some(now);
                } else if syn {
                    return vec![]; // a repeated reverse SYN
                }
                if rewrite::rewrite(&mut pkt, End::Src, self.virt).is_err() {
                    return vec![];
                }
                vec![Out::ToStack(pkt)]
            }
            State::Established => {
                if Some(src) != self.public {
                    return vec![]; // only the learned endpoint may talk on this connection
                }
                if self.resync_early && syn && !ack && Some(seq) == self.camera_isn {
                    // The resync SYN, after the timed step 4. If it reached the NAT after the
                    // timed steered SYN-ACK, conntrack resyncs only with another one, and
                    // smoltcp's first data, dropped meanwhile, goes again behind it. If it came
                    // first, conntrack has resynced and taken newer segments since, so it
                    // ignores this one. Once the camera's segments pass, it is not needed.
                    self.resync_seen = true;
                    if self.camera_acked {
                        return vec![];
                    }
                    return self.step_4_steered_again();
                }
                if !syn {
                    self.camera_acked = true;
                    self.first_data_copy = None;
                }
                if rewrite::rewrite(&mut pkt, End::Src, self.virt).is_err() {
                    return vec![];
                }
                vec![Out::ToStack(pkt)]
            }
            State::Failed(_) => vec![],
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn steered_from_wire(
        &mut self,
        src: SocketAddrV4,
        private: bool,
        (syn, ack, rst): (bool, bool, bool),
        (seq, ackn): (u32, u32),
        ttl: u8,
        steering: Steering,
        pkt: Vec<u8>,
        now: Instant,
    ) -> Vec<Out> {
        if private {
            self.leaked |= syn && ack;
            return vec![];
        }
        if self.predicted_early && !self.step1_seen && syn && !ack && Some(seq) == self.reverse_seq {
            // Step 1 after the predicted steps 2+3: it confirms the prediction or proves it wrong.
            self.step1_seen = true;
            if self.public != Some(src) {
                let predicted = self.public.map(|p| p.to_string()).unwrap_or_default();
                self.fail_timing(format!("the NAT mapped the camera to {src}, not to the predicted {predicted} (timed steps)"));
            } else if let Steering::Ttl { adjust } = steering {
                let hops = 64i16 - ttl as i16 - 1 + adjust as i16;
                if Some(hops) != self.steer_ttl.map(i16::from) {
                    self.fail_timing(format!(
                        "step 1 arrived with TTL {ttl}: the path's hop count changed, the predicted steering TTL {:?} is wrong (timed steps)",
                        self.steer_ttl
                    ));
                }
            }
            return vec![];
        }
        if self.public.is_some_and(|p| p != src) {
            return vec![];
        }
        match self.state {
            State::AwaitReverseSyn if syn && !ack => {
                // Step 1 arrived (before any timer): the mapping and the hop count. Step 2
                // (steered), then step 3.
                self.public = Some(src);
                self.waited(now);
                self.step1_seen = true;
                self.timed_at = None;
                if let Steering::Ttl { adjust } = steering {
                    let hops = 64i16 - ttl as i16 - 1 + adjust as i16;
                    if !(1..=64).contains(&hops) {
                        self.state = State::Failed(format!("cannot steer: step 1 arrived with TTL {ttl}"));
                        return vec![];
                    }
                    self.steer_ttl = Some(hops as u8);
                }
                self.steps_2_and_3(now, seq)
            }
            State::AwaitSynAck if rst && self.predicted_early && !self.step1_seen => {
                self.fail_timing(format!(
                    "{src} answered the timed steered SYN-ACK with RST: it reached the NAT before step 1 made the mapping (timed steps)"
                ));
                vec![]
            }
            State::AwaitSynAck if rst => {
                self.state = State::Failed(format!(
                    "the camera (via {src}) sent RST: a steered packet reached it ({})",
                    if matches!(steering, Steering::Ttl { .. }) {
                        "TTL too high for this path"
                    } else {
                        "it does not drop TCP-MD5 segments"
                    }
                ));
                vec![]
            }
            State::AwaitSynAck if syn && ack && Some(ackn) == self.isn.map(|s| s.wrapping_add(1)) => {
                // Step 3 answered and translated: hold the SYN-ACK, ask for the resync SYN (seq C).
                self.waited(now);
                self.camera_isn = Some(seq);
                // The resync SYN stands for the camera's side: it carries the camera's own
                // options (window scale!) from its SYN-ACK, so conntrack re-learns them.
                let hl = Ipv4Packet::new_unchecked(&pkt[..]).header_len() as usize;
                let options = tcp_options(&pkt[hl..]).to_vec();
                self.held_synack = Some(pkt);
                self.state = State::AwaitResync;
                if let Some(p) = self.pipelining {
                    self.timed_at = Some(now + p.lead);
                }
                let seg = syn_segment_with(self.camera.port(), self.server.port(), seq, &options);
                vec![self.indicate(now, true, seg)]
            }
            State::AwaitResync if syn && !ack && Some(seq) == self.camera_isn => {
                // Step 4 arrived (before any timer): the steered SYN-ACK acking C+1 resyncs
                // conntrack; then the held SYN-ACK completes smoltcp's handshake.
                self.waited(now);
                self.resync_seen = true;
                self.timed_at = None;
                self.release(now)
            }
            State::AwaitResync if rst => {
                self.state = State::Failed(format!("the camera (via {src}) reset the connection during the resync"));
                vec![]
            }
            _ => vec![],
        }
    }

    /// A sequential wait ended: one more round trip, and a sample of its length.
    fn waited(&mut self, now: Instant) {
        self.round_trips += 1;
        // After a retry the packet may answer the earlier indication: no sample.
        if let Some(sent) = self.last_indication.filter(|_| self.step_tries == 1) {
            let sample = now.saturating_duration_since(sent);
            self.rtt = Some(self.rtt.map_or(sample, |r| r.min(sample)));
        }
    }

    /// The prediction, if it can drive steps 2+3 (TTL steering needs a known TTL).
    fn usable_prediction(&self) -> Option<Prediction> {
        let p = self.pipelining?.predicted?;
        match self.strategy {
            Strategy::SteeredResync(Steering::Ttl { .. }) if p.steer_ttl.is_none() => None,
            Strategy::SteeredResync(_) => Some(p),
            _ => None,
        }
    }

    /// Step 2 (the steered SYN-ACK acking step 1's T+1), then step 3's indication.
    fn steps_2_and_3(&mut self, now: Instant, t: u32) -> Vec<Out> {
        let Some(steered) = self.steered_synack(t.wrapping_add(1)) else {
            return vec![];
        };
        self.state = State::AwaitSynAck;
        let syn_pd1 = self.syn_pd1.clone().unwrap_or_default();
        // Two copies: a lost steered packet costs a retry round trip (step 2) or a stalled
        // connection (step 4, where nothing tells the server it was lost).
        vec![Out::ToWire(steered.clone()), Out::ToWire(steered), self.indicate(now, false, syn_pd1)]
    }

    /// Step 4's steered SYN-ACK (acking C+1), two copies; empty before the camera's ISN is known.
    fn step_4_steered(&mut self) -> Vec<Out> {
        match self.camera_isn.and_then(|c| self.steered_synack(c.wrapping_add(1))) {
            Some(st) => vec![Out::ToWire(st.clone()), Out::ToWire(st)],
            None => vec![],
        }
    }

    /// How long after the first data without an answer step 4 is repeated the `k`th time
    /// (from 0): a few of the site's round trips, then 2 s.
    fn resteer_after(&self, k: u32) -> Duration {
        if k == 0 {
            self.rtt.map_or(REINDICATE_AFTER, |rtt| (rtt * RESTEER_FIRST_RTTS).clamp(RESTEER_FIRST_MIN, REINDICATE_AFTER))
        } else {
            REINDICATE_AFTER * (k + 1)
        }
    }

    /// Step 4's steered SYN-ACK once the connection is up, and behind it smoltcp's first data
    /// if that is still unanswered (it reaches the NAT after the resync, so it passes).
    fn step_4_steered_again(&mut self) -> Vec<Out> {
        let mut out = self.step_4_steered();
        if !out.is_empty() {
            out.extend(self.first_data_copy.clone().map(Out::ToWire));
        }
        out
    }

    /// Step 4's steered SYN-ACK, then the held SYN-ACK to smoltcp.
    fn release(&mut self, now: Instant) -> Vec<Out> {
        let mut out = self.step_4_steered();
        if out.is_empty() {
            return out;
        }
        let Some(mut held) = self.held_synack.take() else {
            return vec![];
        };
        if rewrite::rewrite(&mut held, End::Src, self.virt).is_err() {
            return vec![];
        }
        self.state = State::Established;
        self.established_at = Some(now);
        out.push(Out::ToStack(held));
        out
    }

    /// A timed step that is due: steps 2+3 on the prediction, or step 4's release.
    fn fire_timed(&mut self, now: Instant) -> Vec<Out> {
        self.timed_at = None;
        match self.state {
            State::AwaitReverseSyn => {
                let (Some(p), Some(t)) = (self.usable_prediction(), self.reverse_seq) else {
                    return vec![];
                };
                self.public = Some(p.public);
                if matches!(self.strategy, Strategy::SteeredResync(Steering::Ttl { .. })) {
                    self.steer_ttl = p.steer_ttl;
                }
                self.predicted_early = true;
                self.steps_2_and_3(now, t)
            }
            State::AwaitResync => {
                self.resync_early = true;
                let out = self.release(now);
                // Re-sent resync SYNs count against step 4's budget.
                self.step_state = Some(self.state.clone());
                out
            }
            _ => vec![],
        }
    }

    /// After a timed step 4, before any data: the resync SYN has not come back, so it may have
    /// been lost.
    fn resync_unconfirmed(&self) -> bool {
        self.state == State::Established && self.resync_early && !self.resync_seen && !self.camera_acked && self.stack_data_at.is_none()
    }

    /// smoltcp's data has had no answer from the camera since `t`.
    fn unanswered_since(&self) -> Option<Instant> {
        self.stack_data_at.filter(|_| self.state == State::Established && !self.camera_acked)
    }

    /// When to call [`Attempt::tick`] next.
    pub fn poll_at(&self) -> Option<Instant> {
        let retry = self.deadline.min(self.last_indication.map(|t| t + REINDICATE_AFTER).unwrap_or(self.deadline));
        let step = match self.state {
            State::AwaitReverseSyn | State::AwaitResync => Some(retry),
            State::AwaitSynAck if self.retries_synack() => Some(retry),
            State::AwaitSynAck | State::AwaitIsn => Some(self.deadline),
            State::Established => match self.unanswered_since() {
                Some(t) if self.resteered < RESTEER_MAX && self.retries_synack() => Some(t + self.resteer_after(self.resteered)),
                Some(t) if self.first_data_sends >= UNANSWERED_SENDS => Some(t + UNANSWERED_LIMIT),
                Some(t) => Some(t + UNANSWERED_HARD_LIMIT),
                None if self.resync_unconfirmed() && self.step_tries < MAX_INDICATIONS => {
                    self.last_indication.map(|t| t + REINDICATE_AFTER)
                }
                None => None,
            },
            _ => None,
        };
        [step, self.timed_at].into_iter().flatten().min()
    }

    /// steered-resync repeats step 2+3 when the camera's SYN-ACK does not come; patent-syn
    /// relies on smoltcp's own SYN retransmissions instead.
    fn retries_synack(&self) -> bool {
        matches!(self.strategy, Strategy::SteeredResync(_))
    }

    pub fn tick(&mut self, now: Instant) -> Vec<Out> {
        if self.timed_at.is_some_and(|at| now >= at) {
            return self.fire_timed(now);
        }
        if let Some(t) = self.unanswered_since() {
            // smoltcp's data got nothing back: conntrack did not take step 4 (both copies of
            // its steered SYN-ACK lost, or, timed, it overtook a resync SYN that never came
            // back). Conntrack still holds the resync SYN as the last one it ignored, so another
            // steered SYN-ACK completes it, and the first data sent again behind it passes;
            // where conntrack is in sync it ignores it. If the camera stays silent, fail: a
            // reset tells the client at once, where waiting would hang it.
            let waited = now.duration_since(t);
            if (waited >= UNANSWERED_LIMIT && self.first_data_sends >= UNANSWERED_SENDS) || waited >= UNANSWERED_HARD_LIMIT {
                let why = format!(
                    "nothing came back from the camera for {:.0?} after the first data (sent {} times): the NAT drops the camera's segments{}",
                    waited,
                    self.first_data_sends,
                    if self.retries_synack() { " (step 4 did not take)" } else { "" }
                );
                if self.resync_early {
                    self.fail_timing(why + " (timed steps)");
                } else {
                    self.state = State::Failed(why);
                }
                return vec![];
            }
            if self.retries_synack() && self.resteered < RESTEER_MAX && waited >= self.resteer_after(self.resteered) {
                self.resteered += 1;
                return self.step_4_steered_again();
            }
            return vec![];
        }
        if self.resync_unconfirmed() {
            // Nothing sent yet, nothing from the camera, and the resync SYN has not come back
            // within a second: ask for it again (its arrival is answered by a steered SYN-ACK).
            // Never once data flowed: a second resync would be to stale sequence numbers and
            // make conntrack drop the later segments.
            let due = self.last_indication.is_some_and(|t| now.duration_since(t) >= REINDICATE_AFTER);
            if due && self.step_tries < MAX_INDICATIONS {
                if let Some((to_server, pd1)) = self.last_pd1.clone() {
                    return vec![self.indicate(now, to_server, pd1)];
                }
            }
            return vec![];
        }
        let waiting = matches!(self.state, State::AwaitIsn | State::AwaitReverseSyn | State::AwaitSynAck | State::AwaitResync);
        if waiting && now >= self.deadline {
            let why = match (&self.state, self.leaked) {
                (_, true) => "the NAT leaked the camera's answer untranslated (private source): no mapping".to_string(),
                (State::AwaitIsn, _) => "the userspace stack emitted no SYN".to_string(),
                (State::AwaitReverseSyn, _) => "the reverse SYN never arrived through the NAT".to_string(),
                (State::AwaitResync, _) => "the resync SYN never arrived through the NAT".to_string(),
                _ if self.retries_synack() => {
                    "no translated SYN-ACK arrived (the steered SYN-ACK did not reach the NAT's conntrack: TTL too low, or the path drops it)".to_string()
                }
                _ => "no translated SYN-ACK arrived (the NAT dropped the camera's answer, e.g. as conntrack INVALID)".to_string(),
            };
            if self.predicted_early && !self.step1_seen {
                self.fail_timing(format!("{why}; step 1 never arrived after the predicted steps 2+3 (timed steps)"));
            } else {
                self.state = State::Failed(why);
            }
            return vec![];
        }
        let retries = match self.state {
            State::AwaitReverseSyn | State::AwaitResync => true,
            State::AwaitSynAck => self.retries_synack(),
            _ => false,
        };
        let due = self.last_indication.is_some_and(|t| now.duration_since(t) >= REINDICATE_AFTER);
        if !(retries && due && self.step_tries < MAX_INDICATIONS) {
            return vec![];
        }
        let Some((to_server, pd1)) = self.last_pd1.clone() else {
            return vec![];
        };
        let mut out = Vec::new();
        // A lost step 2 would make step 3's answer INVALID: steer again first.
        if self.state == State::AwaitSynAck {
            if let Some(st) = self.last_steered.clone() {
                out.push(Out::ToWire(st));
            }
        }
        out.push(self.indicate(now, to_server, pd1));
        out
    }

    pub fn failed(&self) -> Option<&str> {
        match &self.state {
            State::Failed(why) => Some(why),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Proto;
    use crate::wire::trigger_packet::{build, Addressing};
    use rand::SeedableRng;

    const SERVER: &str = "203.0.113.100:40000";
    const CAMERA: &str = "198.18.1.10:554";
    const VIRT: &str = "198.19.128.1:554";
    const NAT: &str = "203.0.113.2:554";

    fn attempt(s: Strategy, t0: Instant) -> Attempt {
        Attempt::new(s, SERVER.parse().unwrap(), CAMERA.parse().unwrap(), VIRT.parse().unwrap(), t0, Duration::from_secs(3))
    }

    /// An IPv4 TCP packet src → dst with flags.
    fn pkt(src: &str, dst: &str, syn: bool, ack: bool, rst: bool) -> Vec<u8> {
        let (s, d): (SocketAddrV4, SocketAddrV4) = (src.parse().unwrap(), dst.parse().unwrap());
        let mut seg = syn_segment(s.port(), d.port(), 1000);
        {
            let mut t = TcpPacket::new_unchecked(&mut seg[..]);
            t.set_syn(syn);
            t.set_ack(ack);
            t.set_rst(rst);
        }
        build(&Addressing { proto: Proto::Tcp, src: *s.ip(), src_port: s.port(), dst: *d.ip(), dst_port: d.port() }, &seg, 1).unwrap()
    }

    fn src_of(p: &[u8]) -> SocketAddrV4 {
        rewrite::endpoint(p, End::Src).unwrap()
    }
    fn dst_of(p: &[u8]) -> SocketAddrV4 {
        rewrite::endpoint(p, End::Dst).unwrap()
    }

    #[test]
    fn timed_steps_only_where_the_round_trip_is_longer_than_the_lead() {
        assert!(!timing_pays(None));
        assert!(!timing_pays(Some(Duration::from_micros(70))));
        assert!(!timing_pays(Some(STEER_LEAD)));
        assert!(timing_pays(Some(Duration::from_millis(40))));
    }
    #[test]
    fn patent_syn_carries_smoltcps_syn_and_completes_on_translated_synack() {
        let t0 = Instant::now();
        let mut a = attempt(Strategy::PatentSyn, t0);
        assert_eq!(a.start(t0, &mut rand::rngs::StdRng::seed_from_u64(1)), vec![Out::Connect]);
        let syn = pkt(SERVER, VIRT, true, false, false);
        let out = a.from_stack(syn.clone(), t0);
        let [Out::Indicate { to_server: false, pd1 }] = &out[..] else { panic!("{out:?}") };
        assert_eq!(pd1[..], syn[20..]);
        // Retransmissions re-indicate, bounded.
        assert_eq!(a.from_stack(syn.clone(), t0).len(), 1);
        assert_eq!(a.from_stack(syn.clone(), t0).len(), 1);
        assert!(a.from_stack(syn, t0).is_empty());
        assert_eq!(a.indications, 3);
        // A leaked, untranslated SYN-ACK is not a mapping.
        assert!(a.from_wire(pkt(CAMERA, SERVER, true, true, false), t0).is_empty());
        let out = a.from_wire(pkt(NAT, SERVER, true, true, false), t0);
        let [Out::ToStack(p)] = &out[..] else { panic!("{out:?}") };
        assert_eq!(src_of(p), VIRT.parse().unwrap());
        assert_eq!(a.state, State::Established);
        // smoltcp's ACK goes to the mapping.
        let out = a.from_stack(pkt(SERVER, VIRT, false, true, false), t0);
        let [Out::ToWire(p)] = &out[..] else { panic!("{out:?}") };
        assert_eq!(dst_of(p), NAT.parse().unwrap());
        // Strangers are ignored once established.
        assert!(a.from_wire(pkt("203.0.113.9:554", SERVER, false, true, false), t0).is_empty());
    }

    #[test]
    fn patent_syn_fails_with_a_reason_when_the_nat_drops_or_leaks() {
        let t0 = Instant::now();
        let mut a = attempt(Strategy::PatentSyn, t0);
        a.start(t0, &mut rand::rngs::StdRng::seed_from_u64(1));
        a.tick(t0 + Duration::from_secs(3));
        assert!(a.failed().unwrap().contains("no translated SYN-ACK"));
        let mut b = attempt(Strategy::PatentSyn, t0);
        b.from_wire(pkt(CAMERA, SERVER, true, true, false), t0);
        b.tick(t0 + Duration::from_secs(4));
        assert!(b.failed().unwrap().contains("untranslated"));
    }

    #[test]
    fn reverse_syn_is_swallowed_then_server_opens_to_the_mapping() {
        let t0 = Instant::now();
        let mut a = attempt(Strategy::ReverseSyn, t0);
        let out = a.start(t0, &mut rand::rngs::StdRng::seed_from_u64(1));
        let [Out::Indicate { to_server: true, pd1 }] = &out[..] else { panic!("{out:?}") };
        let t = TcpPacket::new_checked(&pd1[..]).unwrap();
        assert!(t.syn() && !t.ack());
        assert_eq!((t.src_port(), t.dst_port()), (554, 40000));
        // Lost: re-indicated after a second, bounded.
        assert!(a.tick(t0 + Duration::from_millis(500)).is_empty());
        assert_eq!(a.tick(t0 + Duration::from_millis(1000)).len(), 1);
        // The reverse SYN arrives translated: swallowed (nothing to the stack), connect now.
        assert_eq!(a.from_wire(pkt(NAT, SERVER, true, false, false), t0), vec![Out::Connect]);
        assert_eq!(a.public, Some(NAT.parse().unwrap()));
        // smoltcp's SYN goes to the mapping; a duplicate reverse SYN is swallowed.
        let out = a.from_stack(pkt(SERVER, VIRT, true, false, false), t0);
        assert!(matches!(&out[..], [Out::ToWire(p)] if dst_of(p) == NAT.parse().unwrap()));
        assert!(a.from_wire(pkt(NAT, SERVER, true, false, false), t0).is_empty());
        let out = a.from_wire(pkt(NAT, SERVER, true, true, false), t0);
        assert!(matches!(&out[..], [Out::ToStack(_)]));
        assert_eq!(a.state, State::Established);
    }

    #[test]
    fn a_direct_connection_whose_camera_stays_silent_fails_whatever_its_strategy() {
        let t0 = Instant::now();
        let mut a = attempt(Strategy::ReverseSyn, t0);
        a.start(t0, &mut rand::rngs::StdRng::seed_from_u64(1));
        a.from_wire(pkt(NAT, SERVER, true, false, false), t0);
        a.from_stack(pkt(SERVER, VIRT, true, false, false), t0); // smoltcp's SYN, seq 1000
        a.from_wire(pkt(NAT, SERVER, true, true, false), t0);
        assert_eq!(a.state, State::Established);
        // Data at ISN+1, sent three times, nothing back: no steered packets, a failure at 5 s.
        let mut data = syn_segment(40000, 554, 1001);
        {
            let mut t = TcpPacket::new_unchecked(&mut data[..]);
            t.clear_flags();
            t.set_ack(true);
        }
        data.extend_from_slice(b"GET / HTTP/1.0\r\n\r\n");
        let (s, d): (SocketAddrV4, SocketAddrV4) = (SERVER.parse().unwrap(), VIRT.parse().unwrap());
        let p =
            build(&Addressing { proto: Proto::Tcp, src: *s.ip(), src_port: s.port(), dst: *d.ip(), dst_port: d.port() }, &data, 1).unwrap();
        for i in 0..3 {
            assert_eq!(a.from_stack(p.clone(), t0 + Duration::from_secs(i)).len(), 1);
        }
        assert!(a.tick(t0 + Duration::from_secs(2)).is_empty());
        assert!(a.tick(t0 + UNANSWERED_LIMIT).is_empty());
        assert!(a.failed().unwrap().contains("nothing came back"), "{:?}", a.state);
    }

    #[test]
    fn reverse_syn_failures() {
        let t0 = Instant::now();
        let mut a = attempt(Strategy::ReverseSyn, t0);
        a.start(t0, &mut rand::rngs::StdRng::seed_from_u64(1));
        a.tick(t0 + Duration::from_secs(3));
        assert!(a.failed().unwrap().contains("never arrived"));
        let mut b = attempt(Strategy::ReverseSyn, t0);
        b.start(t0, &mut rand::rngs::StdRng::seed_from_u64(1));
        b.from_wire(pkt(NAT, SERVER, true, false, false), t0);
        assert!(b.from_wire(pkt(NAT, SERVER, false, false, true), t0).is_empty());
        assert!(b.failed().unwrap().contains("RST"));
        // Wrong server port: not ours.
        let mut c = attempt(Strategy::ReverseSyn, t0);
        assert!(c.from_wire(pkt(NAT, "203.0.113.100:1", true, false, false), t0).is_empty());
        assert_eq!(c.state, State::AwaitReverseSyn);
    }
}

#[cfg(test)]
mod steered_tests {
    use super::*;
    use crate::catalog::Proto;
    use crate::wire::trigger_packet::{build, Addressing};
    use smoltcp::wire::IpAddress;

    const SERVER: &str = "203.0.113.100:40000";
    const CAMERA: &str = "198.18.1.10:554";
    const VIRT: &str = "198.19.128.1:554";
    const NAT: &str = "203.0.113.2:31000";
    const S: u32 = 0xfffffff0; // smoltcp's ISN, near the wrap on purpose
    const C: u32 = 777_000;

    fn seg(src: &str, dst: &str, flags: &str, seq: u32, ack: u32, ttl: u8) -> Vec<u8> {
        let (s, d): (SocketAddrV4, SocketAddrV4) = (src.parse().unwrap(), dst.parse().unwrap());
        let mut b = syn_segment(s.port(), d.port(), seq);
        {
            let mut t = TcpPacket::new_unchecked(&mut b[..]);
            t.clear_flags();
            t.set_syn(flags.contains('S'));
            t.set_ack(flags.contains('A'));
            t.set_rst(flags.contains('R'));
            t.set_ack_number(TcpSeqNumber(ack as i32));
        }
        let mut p =
            build(&Addressing { proto: Proto::Tcp, src: *s.ip(), src_port: s.port(), dst: *d.ip(), dst_port: d.port() }, &b, 1).unwrap();
        let mut ip = Ipv4Packet::new_unchecked(&mut p[..]);
        ip.set_hop_limit(ttl);
        ip.fill_checksum();
        p
    }

    fn tcp(p: &[u8]) -> (Ipv4Packet<&[u8]>, TcpPacket<&[u8]>) {
        let ip = Ipv4Packet::new_checked(p).unwrap();
        let t = TcpPacket::new_checked(&p[20..]).unwrap();
        assert!(ip.verify_checksum());
        assert!(t.verify_checksum(&IpAddress::Ipv4(ip.src_addr()), &IpAddress::Ipv4(ip.dst_addr())), "TCP checksum");
        (ip, t)
    }

    fn attempt(steering: Steering) -> (Attempt, Instant) {
        let t0 = Instant::now();
        let a = Attempt::new(
            Strategy::SteeredResync(steering),
            SERVER.parse().unwrap(),
            CAMERA.parse().unwrap(),
            VIRT.parse().unwrap(),
            t0,
            Duration::from_secs(3),
        );
        (a, t0)
    }

    /// Drive to step 1's indication; returns the reverse SYN's seq T.
    fn to_step1(a: &mut Attempt, t0: Instant) -> u32 {
        assert_eq!(a.start(t0, &mut rand::rng()), vec![Out::Connect]);
        let out = a.from_stack(seg(SERVER, VIRT, "S", S, 0, 64), t0);
        let [Out::Indicate { to_server: true, pd1 }] = &out[..] else { panic!("{out:?}") };
        let t = TcpPacket::new_checked(&pd1[..]).unwrap();
        assert!(t.syn() && !t.ack());
        assert_eq!((t.src_port(), t.dst_port()), (554, 40000));
        // smoltcp's own SYN retransmissions never leave the server.
        assert!(a.from_stack(seg(SERVER, VIRT, "S", S, 0, 64), t0).is_empty());
        t.seq_number().0 as u32
    }

    /// Through step 3's indication (step 1 arrived with TTL 61, so the steered TTL is 2).
    fn to_step3(a: &mut Attempt, t0: Instant) {
        let t = to_step1(a, t0);
        let out = a.from_wire(seg(NAT, SERVER, "S", t, 0, 61), t0);
        let [Out::ToWire(steered), Out::ToWire(copy), Out::Indicate { to_server: false, pd1 }] = &out[..] else { panic!("{out:?}") };
        assert_eq!(steered, copy);
        let (ip, st) = tcp(steered);
        assert_eq!(ip.dst_addr(), "203.0.113.2".parse::<std::net::Ipv4Addr>().unwrap());
        assert!(st.syn() && st.ack());
        assert_eq!((st.seq_number().0 as u32, st.ack_number().0 as u32), (S, t.wrapping_add(1)));
        if matches!(a.strategy, Strategy::SteeredResync(Steering::Ttl { .. })) {
            assert_eq!(ip.hop_limit(), 2);
        } else {
            assert_eq!(ip.hop_limit(), 64);
            assert_eq!(&st.options()[..2], &[19, 18]);
        }
        // Step 3 is the patent's SYN: smoltcp's own segment, seq S.
        assert_eq!(TcpPacket::new_checked(&pd1[..]).unwrap().seq_number().0 as u32, S);
    }

    #[test]
    fn full_sequence_ttl_and_md5() {
        for steering in [Steering::Ttl { adjust: 0 }, Steering::Md5] {
            let (mut a, t0) = attempt(steering);
            to_step3(&mut a, t0);
            // A SYN-ACK that does not ack S+1 is not the camera's answer to step 3.
            assert!(a.from_wire(seg(NAT, SERVER, "SA", C, 5, 61), t0).is_empty());
            // The camera's translated SYN-ACK is held (nothing to smoltcp yet); resync requested.
            let out = a.from_wire(seg(NAT, SERVER, "SA", C, S.wrapping_add(1), 61), t0);
            let [Out::Indicate { to_server: true, pd1 }] = &out[..] else { panic!("{out:?}") };
            assert_eq!(TcpPacket::new_checked(&pd1[..]).unwrap().seq_number().0 as u32, C);
            // The resync SYN carries the camera's own options (its window scale).
            assert_eq!(tcp_options(pd1), &LINUX_SYN_OPTIONS[..]);
            assert_eq!(a.state, State::AwaitResync);
            // The camera retransmitting its SYN-ACK meanwhile changes nothing.
            assert!(a.from_wire(seg(NAT, SERVER, "SA", C, S.wrapping_add(1), 61), t0).is_empty());
            let out = a.from_wire(seg(NAT, SERVER, "S", C, 0, 61), t0);
            let [Out::ToWire(steered), Out::ToWire(_), Out::ToStack(held)] = &out[..] else { panic!("{out:?}") };
            let (_, st) = tcp(steered);
            assert_eq!((st.seq_number().0 as u32, st.ack_number().0 as u32), (S, C.wrapping_add(1)));
            // The steered SYN-ACK carries smoltcp's SYN options (window scale 7 here).
            assert!(st.options().windows(3).any(|w| w == [3, 3, 7]), "{:?}", st.options());
            let (_, h) = tcp(held);
            assert_eq!(crate::wire::rewrite::endpoint(held, End::Src).unwrap(), VIRT.parse().unwrap());
            assert_eq!(h.seq_number().0 as u32, C);
            assert_eq!(a.state, State::Established);
            assert_eq!((a.indications, a.round_trips), (3, 3));
            // From now on smoltcp's segments go to the mapping.
            let out = a.from_stack(seg(SERVER, VIRT, "A", S.wrapping_add(1), C.wrapping_add(1), 64), t0);
            assert!(matches!(&out[..], [Out::ToWire(p)] if crate::wire::rewrite::endpoint(p, End::Dst).unwrap() == NAT.parse().unwrap()));
        }
    }

    #[test]
    fn every_step_may_be_lost() {
        let (mut a, t0) = attempt(Steering::Ttl { adjust: 0 });
        // Step 1 lost: re-indicated after a second.
        let t = to_step1(&mut a, t0);
        assert!(matches!(&a.tick(t0 + Duration::from_millis(1000))[..], [Out::Indicate { to_server: true, .. }]));
        // Step 3 (or step 2) lost: steer again, then re-indicate the patent SYN.
        let t1 = t0 + Duration::from_millis(1500);
        a.from_wire(seg(NAT, SERVER, "S", t, 0, 61), t1);
        let out = a.tick(t1 + Duration::from_millis(1000));
        assert!(matches!(&out[..], [Out::ToWire(_), Out::Indicate { to_server: false, .. }]), "{out:?}");
        // Step 4 lost: re-indicated.
        let t2 = t1 + Duration::from_millis(1200);
        a.from_wire(seg(NAT, SERVER, "SA", C, S.wrapping_add(1), 61), t2);
        assert!(matches!(&a.tick(t2 + Duration::from_millis(1000))[..], [Out::Indicate { to_server: true, .. }]));
        // Each step has its own budget: bounded retries, then a clear failure.
        for i in 2..10 {
            a.tick(t2 + Duration::from_millis(1000 * i));
        }
        assert!(a.failed().unwrap().contains("resync SYN never arrived"), "{:?}", a.state);
        assert!(a.indications <= 3 * MAX_INDICATIONS);
    }

    #[test]
    fn steered_packet_reaching_the_camera_or_a_camera_reset_fails_the_attempt() {
        let (mut a, t0) = attempt(Steering::Ttl { adjust: 0 });
        to_step3(&mut a, t0);
        assert!(a.from_wire(seg(NAT, SERVER, "R", 0, 0, 61), t0).is_empty());
        assert!(a.failed().unwrap().contains("TTL too high"), "{:?}", a.state);
        let (mut b, t0) = attempt(Steering::Md5);
        to_step3(&mut b, t0);
        b.from_wire(seg(NAT, SERVER, "SA", C, S.wrapping_add(1), 61), t0);
        b.from_wire(seg(NAT, SERVER, "R", 0, 0, 61), t0);
        assert!(b.failed().unwrap().contains("reset"), "{:?}", b.state);
    }

    #[test]
    fn hop_count_comes_from_the_arriving_ttl_with_the_sites_adjustment() {
        for (ttl_seen, adjust, want) in
            [(61u8, 0i8, Some(2u8)), (59, 0, Some(4)), (61, -1, Some(1)), (61, 1, Some(3)), (63, -1, None), (64, 0, None)]
        {
            let (mut a, t0) = attempt(Steering::Ttl { adjust });
            let t = to_step1(&mut a, t0);
            a.from_wire(seg(NAT, SERVER, "S", t, 0, ttl_seen), t0);
            assert_eq!(a.steer_ttl(), want, "ttl_seen {ttl_seen} adjust {adjust}");
            if want.is_none() {
                assert!(a.failed().unwrap().contains("cannot steer"));
            }
        }
        // Too short a TTL (dies before the NAT): no translated SYN-ACK, a reason that says so.
        let (mut a, t0) = attempt(Steering::Ttl { adjust: -1 });
        let t = to_step1(&mut a, t0);
        a.from_wire(seg(NAT, SERVER, "S", t, 0, 61), t0);
        for i in 1..=4 {
            a.tick(t0 + Duration::from_secs(i));
        }
        assert!(a.failed().unwrap().contains("TTL too low"), "{:?}", a.state);
    }

    #[test]
    fn before_the_mapping_only_the_sites_nat_is_heard() {
        let (mut a, t0) = attempt(Steering::Ttl { adjust: 0 });
        a.nat_ip = Some("203.0.113.2".parse().unwrap());
        let t = to_step1(&mut a, t0);
        assert!(a.from_wire(seg("203.0.113.66:31000", SERVER, "S", t, 0, 61), t0).is_empty());
        assert_eq!(a.state, State::AwaitReverseSyn);
        assert_eq!(a.from_wire(seg(NAT, SERVER, "S", t, 0, 61), t0).len(), 3);
    }

    #[test]
    fn private_sources_and_strangers_are_ignored() {
        let (mut a, t0) = attempt(Steering::Md5);
        let t = to_step1(&mut a, t0);
        assert!(a.from_wire(seg(CAMERA, SERVER, "S", t, 0, 61), t0).is_empty());
        assert_eq!(a.state, State::AwaitReverseSyn);
        a.from_wire(seg(NAT, SERVER, "S", t, 0, 61), t0);
        assert!(a.from_wire(seg("203.0.113.9:31000", SERVER, "SA", C, S.wrapping_add(1), 61), t0).is_empty());
        assert_eq!(a.state, State::AwaitSynAck);
    }

    fn pipelined(steering: Steering, predicted: Option<Prediction>) -> (Attempt, Instant) {
        let (a, t0) = attempt(steering);
        (a.with_pipelining(Pipelining { lead: Duration::from_millis(8), predicted }), t0)
    }

    fn nat_prediction(port: u16) -> Option<Prediction> {
        Some(Prediction { public: SocketAddrV4::new("203.0.113.2".parse().unwrap(), port), steer_ttl: Some(2) })
    }

    /// A camera segment carrying data.
    fn data(src: &str, seq: u32) -> Vec<u8> {
        let (s, d): (SocketAddrV4, SocketAddrV4) = (src.parse().unwrap(), SERVER.parse().unwrap());
        let mut b = syn_segment(s.port(), d.port(), seq);
        {
            let mut t = TcpPacket::new_unchecked(&mut b[..]);
            t.clear_flags();
            t.set_ack(true);
        }
        b.extend_from_slice(b"HTTP/1.0 200 OK\r\n");
        build(&Addressing { proto: Proto::Tcp, src: *s.ip(), src_port: s.port(), dst: *d.ip(), dst_port: d.port() }, &b, 1).unwrap()
    }

    #[test]
    fn predicted_and_timed_steps_wait_for_one_round_trip() {
        let (mut a, t0) = pipelined(Steering::Ttl { adjust: 0 }, nat_prediction(31000));
        let t = to_step1(&mut a, t0);
        let lead = Duration::from_millis(8);
        assert_eq!(a.poll_at(), Some(t0 + lead));
        assert!(a.tick(t0 + Duration::from_millis(7)).is_empty());
        // Steps 2+3 on the timer, to the predicted mapping with the remembered TTL.
        let out = a.tick(t0 + lead);
        let [Out::ToWire(steered), Out::ToWire(_), Out::Indicate { to_server: false, pd1 }] = &out[..] else { panic!("{out:?}") };
        let (ip, st) = tcp(steered);
        assert_eq!(crate::wire::rewrite::endpoint(steered, End::Dst).unwrap(), NAT.parse().unwrap());
        assert_eq!((ip.hop_limit(), st.seq_number().0 as u32, st.ack_number().0 as u32), (2, S, t.wrapping_add(1)));
        assert_eq!(TcpPacket::new_checked(&pd1[..]).unwrap().seq_number().0 as u32, S);
        // Step 1 arrives later, from the predicted mapping: confirmed, nothing to do.
        let t1 = t0 + Duration::from_millis(40);
        assert!(a.from_wire(seg(NAT, SERVER, "S", t, 0, 61), t1).is_empty());
        assert_eq!(a.state, State::AwaitSynAck);
        // The camera's SYN-ACK: resync requested, step 4 on the timer.
        let t2 = t0 + Duration::from_millis(50);
        let out = a.from_wire(seg(NAT, SERVER, "SA", C, S.wrapping_add(1), 61), t2);
        assert!(matches!(&out[..], [Out::Indicate { to_server: true, .. }]), "{out:?}");
        assert_eq!(a.poll_at(), Some(t2 + lead));
        let out = a.tick(t2 + lead);
        let [Out::ToWire(steered), Out::ToWire(_), Out::ToStack(held)] = &out[..] else { panic!("{out:?}") };
        let (_, st) = tcp(steered);
        assert_eq!((st.seq_number().0 as u32, st.ack_number().0 as u32), (S, C.wrapping_add(1)));
        assert_eq!(crate::wire::rewrite::endpoint(held, End::Src).unwrap(), VIRT.parse().unwrap());
        assert_eq!(a.state, State::Established);
        assert_eq!((a.round_trips, a.timed_steps(), a.indications), (1, 2, 3));
        // The resync SYN comes back after the timed step: steered once more (in case it reached
        // the NAT late), never passed to smoltcp. Camera data then flows to smoltcp.
        let out = a.from_wire(seg(NAT, SERVER, "S", C, 0, 61), t2 + Duration::from_millis(41));
        assert!(matches!(&out[..], [Out::ToWire(_), Out::ToWire(_)]), "{out:?}");
        assert!(matches!(&a.from_wire(data(NAT, C.wrapping_add(1)), t2)[..], [Out::ToStack(_)]));
        // Once data flowed, a stray resync SYN is swallowed without steering (conntrack would
        // resync to a stale sequence number).
        assert!(a.from_wire(seg(NAT, SERVER, "S", C, 0, 61), t2).is_empty());
        assert_eq!(a.poll_at(), None);
    }

    #[test]
    fn a_wrong_prediction_or_an_overtaking_steered_packet_fails_at_once() {
        // The NAT picked another port: step 1 says so.
        let (mut a, t0) = pipelined(Steering::Md5, nat_prediction(554));
        let t = to_step1(&mut a, t0);
        assert_eq!(a.tick(t0 + Duration::from_millis(8)).len(), 3);
        a.from_wire(seg(NAT, SERVER, "S", t, 0, 61), t0 + Duration::from_millis(40));
        assert!(a.failed().unwrap().contains("not to the predicted 203.0.113.2:554"), "{:?}", a.state);
        assert!(a.failed_by_timing());
        // The steered SYN-ACK reached the NAT before step 1: the NAT itself answers RST.
        let (mut b, t0) = pipelined(Steering::Ttl { adjust: 0 }, nat_prediction(31000));
        to_step1(&mut b, t0);
        b.tick(t0 + Duration::from_millis(8));
        b.from_wire(seg(NAT, SERVER, "R", 0, 0, 61), t0 + Duration::from_millis(30));
        assert!(b.failed().unwrap().contains("before step 1"), "{:?}", b.state);
        // TTL steering without a known TTL: no prediction, step 1 is awaited.
        let no_ttl = Some(Prediction { public: NAT.parse().unwrap(), steer_ttl: None });
        let (mut c, t0) = pipelined(Steering::Ttl { adjust: 0 }, no_ttl);
        to_step1(&mut c, t0);
        assert!(c.tick(t0 + Duration::from_millis(8)).is_empty());
        assert_eq!(c.state, State::AwaitReverseSyn);
    }

    #[test]
    fn packets_faster_than_the_timer_drive_the_steps_as_before() {
        let (mut a, t0) = pipelined(Steering::Ttl { adjust: 0 }, nat_prediction(31000));
        let t = to_step1(&mut a, t0);
        let soon = t0 + Duration::from_millis(1);
        assert_eq!(a.from_wire(seg(NAT, SERVER, "S", t, 0, 61), soon).len(), 3);
        assert!(a.tick(t0 + Duration::from_millis(8)).is_empty());
        a.from_wire(seg(NAT, SERVER, "SA", C, S.wrapping_add(1), 61), soon);
        let out = a.from_wire(seg(NAT, SERVER, "S", C, 0, 61), soon);
        assert!(matches!(&out[..], [Out::ToWire(_), Out::ToWire(_), Out::ToStack(_)]), "{out:?}");
        assert!(a.tick(t0 + Duration::from_millis(20)).is_empty());
        assert_eq!((a.state.clone(), a.round_trips, a.timed_steps()), (State::Established, 3, 0));
        assert!(!a.failed_by_timing());
    }

    #[test]
    fn a_resync_syn_that_never_comes_back_is_asked_for_again_until_data_flows() {
        let (mut a, t0) = pipelined(Steering::Md5, None);
        let t = to_step1(&mut a, t0);
        assert!(a.tick(t0 + Duration::from_millis(8)).is_empty()); // no prediction: step 1 awaited
        a.from_wire(seg(NAT, SERVER, "S", t, 0, 61), t0);
        a.from_wire(seg(NAT, SERVER, "SA", C, S.wrapping_add(1), 61), t0);
        assert_eq!(a.tick(t0 + Duration::from_millis(8)).len(), 3);
        assert_eq!((a.round_trips, a.timed_steps()), (2, 1));
        // No resync SYN and no data within a second: asked for again, within step 4's budget.
        let t1 = t0 + REINDICATE_AFTER;
        assert_eq!(a.poll_at(), Some(t1));
        assert!(matches!(&a.tick(t1)[..], [Out::Indicate { to_server: true, .. }]));
        assert!(matches!(&a.tick(t1 + REINDICATE_AFTER)[..], [Out::Indicate { to_server: true, .. }]));
        assert!(a.tick(t1 + REINDICATE_AFTER * 2).is_empty());
        assert!(a.indications <= 2 + MAX_INDICATIONS);
        // Data proves the resync: nothing more.
        let (mut b, t0) = timed_step_4();
        b.from_wire(data(NAT, C.wrapping_add(1)), t0 + Duration::from_millis(50));
        assert_eq!(b.poll_at(), None);
        assert!(b.tick(t0 + REINDICATE_AFTER).is_empty());
    }

    #[test]
    fn hints_predict_only_where_the_nat_kept_ports() {
        let nat: std::net::Ipv4Addr = "203.0.113.2".parse().unwrap();
        let camera: SocketAddrV4 = CAMERA.parse().unwrap();
        let ttl = Strategy::SteeredResync(Steering::Ttl { adjust: 0 });
        let md5 = Strategy::SteeredResync(Steering::Md5);
        // Learned from a step-by-step TTL attempt whose mapping kept the port.
        let (mut a, t0) = attempt(Steering::Ttl { adjust: 0 });
        let t = to_step1(&mut a, t0);
        a.from_wire(seg("203.0.113.2:554", SERVER, "S", t, 0, 61), t0);
        a.from_wire(seg("203.0.113.2:554", SERVER, "SA", C, S.wrapping_add(1), 61), t0);
        a.from_wire(seg("203.0.113.2:554", SERVER, "S", C, 0, 61), t0);
        let hint = SteerHint::default().learn(&a).unwrap();
        assert_eq!(hint, SteerHint { port_preserved: true, ttl: Some((ttl, 2)) });
        let want = Some(Prediction { public: "203.0.113.2:554".parse().unwrap(), steer_ttl: Some(2) });
        assert_eq!(hint.predict(ttl, nat, camera), want);
        assert_eq!(hint.predict(md5, nat, camera).map(|p| p.steer_ttl), Some(None));
        // Another TTL adjustment, or a NAT that moved ports: no prediction.
        assert_eq!(hint.predict(Strategy::SteeredResync(Steering::Ttl { adjust: 1 }), nat, camera), None);
        assert_eq!(SteerHint { port_preserved: false, ..hint }.predict(ttl, nat, camera), None);
        // An MD5 success keeps the TTL learned before; an unfinished attempt teaches nothing.
        let (mut b, t0) = attempt(Steering::Md5);
        let t = to_step1(&mut b, t0);
        assert_eq!(hint.learn(&b), None);
        b.from_wire(seg(NAT, SERVER, "S", t, 0, 61), t0);
        b.from_wire(seg(NAT, SERVER, "SA", C, S.wrapping_add(1), 61), t0);
        b.from_wire(seg(NAT, SERVER, "S", C, 0, 61), t0);
        assert_eq!(hint.learn(&b), Some(SteerHint { port_preserved: false, ttl: Some((ttl, 2)) }));
    }

    /// MD5 steering, no prediction: step by step to the camera's SYN-ACK, then step 4 on the
    /// timer (8 ms later); the connection is up.
    fn timed_step_4() -> (Attempt, Instant) {
        let (mut a, t0) = pipelined(Steering::Md5, None);
        let t = to_step1(&mut a, t0);
        a.from_wire(seg(NAT, SERVER, "S", t, 0, 61), t0);
        a.from_wire(seg(NAT, SERVER, "SA", C, S.wrapping_add(1), 61), t0);
        assert_eq!(a.tick(t0 + Duration::from_millis(8)).len(), 3);
        assert_eq!((a.state.clone(), a.timed_steps()), (State::Established, 1));
        (a, t0)
    }

    /// smoltcp's segment with data, as the shard hands it to the attempt.
    fn request() -> Vec<u8> {
        let mut req = data(VIRT, S.wrapping_add(1));
        rewrite::rewrite(&mut req, End::Dst, VIRT.parse().unwrap()).unwrap();
        rewrite::rewrite(&mut req, End::Src, SERVER.parse().unwrap()).unwrap();
        req
    }

    #[test]
    fn after_a_timed_step_4_data_without_an_answer_is_resteered_then_fails_and_is_never_resynced_again() {
        let (mut a, t0) = timed_step_4();
        // smoltcp sends the client's request; the resync SYN never comes back, nor anything else.
        let t1 = t0 + Duration::from_millis(9);
        assert_eq!(a.from_stack(request(), t1).len(), 1);
        // No second resync SYN once data went out: step 4's steered SYN-ACK again, twice, each
        // with the request behind it, then the verdict. The first after a few of the site's
        // round trips (here ≈ 0: the floor), the second after 2 s.
        assert_eq!(a.poll_at(), Some(t1 + RESTEER_FIRST_MIN));
        assert!(a.tick(t1 + RESTEER_FIRST_MIN - Duration::from_millis(1)).is_empty());
        for at in [RESTEER_FIRST_MIN, REINDICATE_AFTER * 2] {
            assert_eq!(a.poll_at(), Some(t1 + at));
            let out = a.tick(t1 + at);
            let [Out::ToWire(st), Out::ToWire(_), Out::ToWire(again)] = &out[..] else { panic!("{out:?}") };
            assert_eq!(tcp(st).1.ack_number().0 as u32, C.wrapping_add(1));
            assert_eq!(tcp(again).1.seq_number().0 as u32, S.wrapping_add(1));
            assert_eq!(crate::wire::rewrite::endpoint(again, End::Dst).unwrap(), NAT.parse().unwrap());
        }
        // Sent once only: a lossy path with a long retransmission timeout, not yet a dead one.
        assert_eq!(a.poll_at(), Some(t1 + UNANSWERED_HARD_LIMIT));
        assert!(a.tick(t1 + UNANSWERED_LIMIT).is_empty());
        assert!(a.failed().is_none());
        // smoltcp retransmits it twice more (a keepalive probe, one below, does not count).
        let mut probe = request();
        {
            let ihl = 20;
            let mut t = TcpPacket::new_unchecked(&mut probe[ihl..]);
            t.set_seq_number(TcpSeqNumber(S as i32));
        }
        a.from_stack(probe, t1 + Duration::from_secs(2));
        assert_eq!(a.poll_at(), Some(t1 + UNANSWERED_HARD_LIMIT));
        a.from_stack(request(), t1 + Duration::from_secs(2));
        a.from_stack(request(), t1 + Duration::from_secs(4));
        assert_eq!(a.poll_at(), Some(t1 + UNANSWERED_LIMIT));
        assert!(a.tick(t1 + UNANSWERED_LIMIT).is_empty());
        assert!(a.failed_by_timing(), "{:?}", a.state);
        assert!(a.failed().unwrap().contains("step 4 did not take"), "{:?}", a.state);
        // smoltcp's reset for the failed connection still goes to the camera's mapping.
        let mut rst = seg(SERVER, VIRT, "R", S.wrapping_add(1), 0, 64);
        rewrite::rewrite(&mut rst, End::Dst, VIRT.parse().unwrap()).unwrap();
        let out = a.from_stack(rst, t1 + UNANSWERED_LIMIT);
        assert!(
            matches!(&out[..], [Out::ToWire(p)] if crate::wire::rewrite::endpoint(p, End::Dst).unwrap() == NAT.parse().unwrap()),
            "{out:?}"
        );
    }

    #[test]
    fn a_step_by_step_connection_whose_step_4_was_lost_is_resteered_and_heals() {
        let (mut a, t0) = attempt(Steering::Ttl { adjust: 0 });
        to_step3(&mut a, t0);
        a.from_wire(seg(NAT, SERVER, "SA", C, S.wrapping_add(1), 61), t0);
        assert_eq!(a.from_wire(seg(NAT, SERVER, "S", C, 0, 61), t0).len(), 3);
        assert_eq!(a.state, State::Established);
        assert_eq!(a.poll_at(), None, "nothing to check before data");
        let t1 = t0 + Duration::from_millis(5);
        a.from_stack(request(), t1);
        assert_eq!(a.tick(t1 + REINDICATE_AFTER).len(), 3, "steered twice, the request behind");
        // The camera's ACK arrives (the second steered SYN-ACK completed the resync): done.
        assert!(matches!(&a.from_wire(seg(NAT, SERVER, "A", C.wrapping_add(1), S.wrapping_add(40), 61), t1)[..], [Out::ToStack(_)]));
        assert_eq!(a.poll_at(), None);
        assert!(a.tick(t1 + UNANSWERED_LIMIT).is_empty());
        assert!(a.failed().is_none());
        // Without any answer the step-by-step connection fails too, but not as the timing's.
        let (mut b, t0) = attempt(Steering::Ttl { adjust: 0 });
        to_step3(&mut b, t0);
        b.from_wire(seg(NAT, SERVER, "SA", C, S.wrapping_add(1), 61), t0);
        b.from_wire(seg(NAT, SERVER, "S", C, 0, 61), t0);
        for i in 0..3 {
            b.from_stack(request(), t0 + Duration::from_secs(i));
        }
        for i in 1..=5 {
            b.tick(t0 + Duration::from_secs(i));
        }
        assert!(b.failed().is_some() && !b.failed_by_timing(), "{:?}", b.state);
    }

    #[test]
    fn a_late_resync_syn_is_steered_again_with_the_unanswered_request_behind_it() {
        // The trigger's resync SYN reached the NAT after the timed steered SYN-ACK: conntrack
        // dropped smoltcp's request. When the resync SYN arrives, the steered SYN-ACK resyncs
        // conntrack and the request goes again at once, not after smoltcp's 1 s timeout.
        let (mut a, t0) = timed_step_4();
        let t1 = t0 + Duration::from_millis(9);
        let [Out::ToWire(first)] = &a.from_stack(request(), t1)[..] else { panic!() };
        let first = first.clone();
        // smoltcp sends it again (here with another window): the copy is the latest.
        let mut again = request();
        TcpPacket::new_unchecked(&mut again[20..]).set_window_len(1234);
        let [Out::ToWire(sent)] = &a.from_stack(again, t1 + Duration::from_millis(20))[..] else { panic!() };
        let sent = sent.clone();
        assert_ne!(sent, first);
        let out = a.from_wire(seg(NAT, SERVER, "S", C, 0, 61), t1 + Duration::from_millis(40));
        let [Out::ToWire(st), Out::ToWire(_), Out::ToWire(again)] = &out[..] else { panic!("{out:?}") };
        assert_eq!((tcp(st).1.seq_number().0 as u32, tcp(st).1.ack_number().0 as u32), (S, C.wrapping_add(1)));
        assert_eq!(again, &sent, "the request exactly as it went on the wire");
        // The camera answers: nothing is re-sent from then on.
        assert!(matches!(&a.from_wire(seg(NAT, SERVER, "A", C.wrapping_add(1), S.wrapping_add(40), 61), t1)[..], [Out::ToStack(_)]));
        assert!(a.first_data_copy.is_none());
        assert!(a.from_wire(seg(NAT, SERVER, "S", C, 0, 61), t1).is_empty());
        // A late resync SYN before any data: steered only (nothing to re-send).
        let (mut b, t0) = timed_step_4();
        assert_eq!(b.from_wire(seg(NAT, SERVER, "S", C, 0, 61), t0 + Duration::from_millis(40)).len(), 2);
        // Other strategies keep no copy (they never steer again).
        for strategy in [Strategy::ReverseSyn, Strategy::PatentSyn] {
            let (mut c, t0) = (attempt(Steering::Md5).0, t0);
            c.strategy = strategy;
            c.state = State::Established;
            c.public = Some(NAT.parse().unwrap());
            c.isn = Some(S);
            assert!(matches!(&c.from_stack(request(), t0)[..], [Out::ToWire(_)]), "{strategy:?}");
            assert!(c.first_data_copy.is_none(), "{strategy:?}");
        }
    }

    #[test]
    fn the_first_repeat_of_step_4_follows_the_sites_round_trip() {
        for (rtt, first) in [
            (Some(Duration::from_millis(40)), Duration::from_millis(160)),
            (Some(Duration::from_micros(100)), RESTEER_FIRST_MIN),
            (Some(Duration::from_millis(400)), REINDICATE_AFTER),
            (None, REINDICATE_AFTER),
        ] {
            let (mut a, t0) = attempt(Steering::Ttl { adjust: 0 });
            to_step3(&mut a, t0);
            a.from_wire(seg(NAT, SERVER, "SA", C, S.wrapping_add(1), 61), t0);
            a.from_wire(seg(NAT, SERVER, "S", C, 0, 61), t0);
            a.rtt = rtt;
            let t1 = t0 + Duration::from_millis(5);
            a.from_stack(request(), t1);
            assert_eq!(a.poll_at(), Some(t1 + first), "{rtt:?}");
            assert!(a.tick(t1 + first - Duration::from_millis(1)).is_empty(), "{rtt:?}");
            assert_eq!(a.tick(t1 + first).len(), 3, "{rtt:?}: steered twice, the request behind");
            assert_eq!(a.poll_at(), Some(t1 + REINDICATE_AFTER * 2), "{rtt:?}");
        }
    }

    #[test]
    fn a_camera_ack_proves_the_timed_resync() {
        let (mut a, t0) = timed_step_4();
        // A segment from the camera: the NAT passes them, nothing more to do.
        assert!(matches!(&a.from_wire(seg(NAT, SERVER, "A", C.wrapping_add(1), S.wrapping_add(1), 61), t0)[..], [Out::ToStack(_)]));
        assert_eq!(a.poll_at(), None);
        assert!(a.from_wire(seg(NAT, SERVER, "S", C, 0, 61), t0).is_empty(), "a late resync SYN is not steered again");
        assert!(a.failed().is_none());
    }

    #[test]
    fn a_changed_hop_count_fails_a_predicted_attempt_and_other_failures_are_not_timings() {
        let (mut a, t0) = pipelined(Steering::Ttl { adjust: 0 }, nat_prediction(31000));
        let t = to_step1(&mut a, t0);
        a.tick(t0 + Duration::from_millis(8)); // steered with the predicted TTL 2
        a.from_wire(seg(NAT, SERVER, "S", t, 0, 60), t0 + Duration::from_millis(40)); // one hop more
        assert!(a.failed_by_timing() && a.failed().unwrap().contains("hop count"), "{:?}", a.state);
        // Step 1 confirmed the prediction; a camera that then resets is not the timing's fault.
        let (mut b, t0) = pipelined(Steering::Ttl { adjust: 0 }, nat_prediction(31000));
        let t = to_step1(&mut b, t0);
        b.tick(t0 + Duration::from_millis(8));
        b.from_wire(seg(NAT, SERVER, "S", t, 0, 61), t0 + Duration::from_millis(40));
        b.from_wire(seg(NAT, SERVER, "R", 0, 0, 61), t0 + Duration::from_millis(41));
        assert!(b.failed().is_some() && !b.failed_by_timing(), "{:?}", b.state);
        // A predicted attempt whose step 1 never comes: the timing's failure at the deadline.
        let (mut c, t0) = pipelined(Steering::Md5, nat_prediction(31000));
        to_step1(&mut c, t0);
        c.tick(t0 + Duration::from_millis(8));
        for i in 1..=6 {
            c.tick(t0 + Duration::from_secs(i));
        }
        assert!(c.failed_by_timing(), "{:?}", c.state);
    }
}
