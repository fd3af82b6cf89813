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

use crate::wire::rewrite::{self, End};
use rand::Rng;
use serde::{Deserialize, Serialize};
use smoltcp::wire::{IpProtocol, Ipv4Packet, TcpPacket, TcpSeqNumber};
use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    PatentSyn,
    ReverseSyn,
}

impl Strategy {
    pub const ALL: [Strategy; 2] = [Strategy::ReverseSyn, Strategy::PatentSyn];
    pub fn name(self) -> &'static str {
        match self {
            Strategy::PatentSyn => "patent-syn",
            Strategy::ReverseSyn => "reverse-syn",
        }
    }
}

/// A trigger packet is re-sent at most this often, and at most `MAX_INDICATIONS` times.
pub const REINDICATE_AFTER: Duration = Duration::from_secs(1);
pub const MAX_INDICATIONS: u32 = 3;

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
    /// reverse-syn: waiting for the trigger's reverse SYN to arrive through the NAT.
    AwaitReverseSyn,
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
    last_indication: Option<Instant>,
    /// The trigger packet to repeat if it (or the camera's answer) is lost.
    last_pd1: Option<(bool, Vec<u8>)>,
    deadline: Instant,
    /// A SYN-ACK arrived from a private address: the NAT leaked it untranslated.
    leaked: bool,
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

/// A bare SYN segment (20-byte header + MSS option), checksum left for the trigger to fill.
pub fn syn_segment(src_port: u16, dst_port: u16, seq: u32) -> Vec<u8> {
    let mut seg = vec![0u8; 24];
    let mut t = TcpPacket::new_unchecked(&mut seg[..]);
    t.set_src_port(src_port);
    t.set_dst_port(dst_port);
    t.set_seq_number(TcpSeqNumber(seq as i32));
    t.set_header_len(24);
    t.clear_flags();
    t.set_syn(true);
    t.set_window_len(64240);
    seg[20..24].copy_from_slice(&[2, 4, 0x05, 0xb4]); // MSS 1460
    seg
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
            },
            started: now,
            established_at: None,
            indications: 0,
            last_indication: None,
            last_pd1: None,
            deadline: now + timeout,
            leaked: false,
        }
    }

    fn indicate(&mut self, now: Instant, to_server: bool, pd1: Vec<u8>) -> Out {
        self.indications += 1;
        self.last_indication = Some(now);
        self.last_pd1 = Some((to_server, pd1.clone()));
        Out::Indicate { to_server, pd1 }
    }

    /// Begin: reverse-syn asks for the reverse SYN; patent-syn lets smoltcp connect (its SYN
    /// comes back through [`Attempt::from_stack`]).
    pub fn start(&mut self, now: Instant, rng: &mut impl Rng) -> Vec<Out> {
        match self.strategy {
            Strategy::PatentSyn => vec![Out::Connect],
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
        let hl = Ipv4Packet::new_unchecked(&pkt[..]).header_len() as usize;
        match (&self.state, self.strategy) {
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
        let (syn, ack, rst) = (t.syn(), t.ack(), t.rst());
        match self.state {
            State::AwaitReverseSyn => {
                if syn && !ack && src.port() != 0 {
                    if private {
                        self.leaked = true;
                        return vec![];
                    }
                    // The reverse SYN came through the NAT: swallow it, learn the mapping.
                    self.public = Some(src);
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
                if rewrite::rewrite(&mut pkt, End::Src, self.virt).is_err() {
                    return vec![];
                }
                vec![Out::ToStack(pkt)]
            }
            State::Failed(_) => vec![],
        }
    }

    /// When to call [`Attempt::tick`] next.
    pub fn poll_at(&self) -> Option<Instant> {
        match self.state {
            State::AwaitReverseSyn => Some(
                self.deadline.min(
                    self.last_indication
                        .map(|t| t + REINDICATE_AFTER)
                        .unwrap_or(self.deadline),
                ),
            ),
            State::AwaitSynAck => Some(self.deadline),
            _ => None,
        }
    }

    pub fn tick(&mut self, now: Instant) -> Vec<Out> {
        match self.state {
            State::AwaitReverseSyn | State::AwaitSynAck if now >= self.deadline => {
                let why = match (&self.state, self.leaked) {
                    (_, true) => "the NAT leaked the camera's answer untranslated (private source): no mapping".to_string(),
                    (State::AwaitReverseSyn, _) => "the reverse SYN never arrived through the NAT".to_string(),
                    _ => "no translated SYN-ACK arrived (the NAT dropped the camera's answer, e.g. as conntrack INVALID)".to_string(),
                };
                self.state = State::Failed(why);
                vec![]
            }
            State::AwaitReverseSyn => {
                let due = self
                    .last_indication
                    .is_some_and(|t| now.duration_since(t) >= REINDICATE_AFTER);
                if due && self.indications < MAX_INDICATIONS {
                    if let Some((to_server, pd1)) = self.last_pd1.clone() {
                        return vec![self.indicate(now, to_server, pd1)];
                    }
                }
                vec![]
            }
            _ => vec![],
        }
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
        Attempt::new(
            s,
            SERVER.parse().unwrap(),
            CAMERA.parse().unwrap(),
            VIRT.parse().unwrap(),
            t0,
            Duration::from_secs(3),
        )
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
        build(
            &Addressing {
                proto: Proto::Tcp,
                src: *s.ip(),
                src_port: s.port(),
                dst: *d.ip(),
                dst_port: d.port(),
            },
            &seg,
            1,
        )
        .unwrap()
    }

    fn src_of(p: &[u8]) -> SocketAddrV4 {
        rewrite::endpoint(p, End::Src).unwrap()
    }
    fn dst_of(p: &[u8]) -> SocketAddrV4 {
        rewrite::endpoint(p, End::Dst).unwrap()
    }

    #[test]
    fn patent_syn_carries_smoltcps_syn_and_completes_on_translated_synack() {
        let t0 = Instant::now();
        let mut a = attempt(Strategy::PatentSyn, t0);
        assert_eq!(
            a.start(t0, &mut rand::rngs::StdRng::seed_from_u64(1)),
            vec![Out::Connect]
        );
        let syn = pkt(SERVER, VIRT, true, false, false);
        let out = a.from_stack(syn.clone(), t0);
        let [Out::Indicate {
            to_server: false,
            pd1,
        }] = &out[..]
        else {
            panic!("{out:?}")
        };
        assert_eq!(pd1[..], syn[20..]);
        // Retransmissions re-indicate, bounded.
        assert_eq!(a.from_stack(syn.clone(), t0).len(), 1);
        assert_eq!(a.from_stack(syn.clone(), t0).len(), 1);
        assert!(a.from_stack(syn, t0).is_empty());
        assert_eq!(a.indications, 3);
        // A leaked, untranslated SYN-ACK is not a mapping.
        assert!(a
            .from_wire(pkt(CAMERA, SERVER, true, true, false), t0)
            .is_empty());
        let out = a.from_wire(pkt(NAT, SERVER, true, true, false), t0);
        let [Out::ToStack(p)] = &out[..] else {
            panic!("{out:?}")
        };
        assert_eq!(src_of(p), VIRT.parse().unwrap());
        assert_eq!(a.state, State::Established);
        // smoltcp's ACK goes to the mapping.
        let out = a.from_stack(pkt(SERVER, VIRT, false, true, false), t0);
        let [Out::ToWire(p)] = &out[..] else {
            panic!("{out:?}")
        };
        assert_eq!(dst_of(p), NAT.parse().unwrap());
        // Strangers are ignored once established.
        assert!(a
            .from_wire(pkt("203.0.113.9:554", SERVER, false, true, false), t0)
            .is_empty());
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
        let [Out::Indicate {
            to_server: true,
            pd1,
        }] = &out[..]
        else {
            panic!("{out:?}")
        };
        let t = TcpPacket::new_checked(&pd1[..]).unwrap();
        assert!(t.syn() && !t.ack());
        assert_eq!((t.src_port(), t.dst_port()), (554, 40000));
        // Lost: re-indicated after a second, bounded.
        assert!(a.tick(t0 + Duration::from_millis(500)).is_empty());
        assert_eq!(a.tick(t0 + Duration::from_millis(1000)).len(), 1);
        // The reverse SYN arrives translated: swallowed (nothing to the stack), connect now.
        assert_eq!(
            a.from_wire(pkt(NAT, SERVER, true, false, false), t0),
            vec![Out::Connect]
        );
        assert_eq!(a.public, Some(NAT.parse().unwrap()));
        // smoltcp's SYN goes to the mapping; a duplicate reverse SYN is swallowed.
        let out = a.from_stack(pkt(SERVER, VIRT, true, false, false), t0);
        assert!(matches!(&out[..], [Out::ToWire(p)] if dst_of(p) == NAT.parse().unwrap()));
        assert!(a
            .from_wire(pkt(NAT, SERVER, true, false, false), t0)
            .is_empty());
        let out = a.from_wire(pkt(NAT, SERVER, true, true, false), t0);
        assert!(matches!(&out[..], [Out::ToStack(_)]));
        assert_eq!(a.state, State::Established);
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
        assert!(b
            .from_wire(pkt(NAT, SERVER, false, false, true), t0)
            .is_empty());
        assert!(b.failed().unwrap().contains("RST"));
        // Wrong server port: not ours.
        let mut c = attempt(Strategy::ReverseSyn, t0);
        assert!(c
            .from_wire(pkt(NAT, "203.0.113.100:1", true, false, false), t0)
            .is_empty());
        assert_eq!(c.state, State::AwaitReverseSyn);
    }
}
