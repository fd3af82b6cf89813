//! The direct-TCP traversal state machine (`server::tcp_strategy::Attempt`) driven by an arbitrary
//! sequence of packets from the wire (anyone can send to `public_ip:P`), packets from the
//! userspace stack, and clock ticks, for every strategy.
//!
//! Oracles: no panic; the learned mapping is never a private address and never changes once
//! learned; nothing reaches the stack except packets from the learned mapping, rewritten to come
//! from the virtual camera address (one known exception, see `Out::ToStack` below); nothing
//! leaves for the wire except towards the learned mapping; every reverse-SYN indication passes
//! the trigger's own packet checks; indications are bounded; Failed and Established are final,
//! and a failed attempt emits nothing.
#![no_main]

use arbitrary::Arbitrary;
use beckon::catalog::Proto;
use beckon::server::tcp_strategy::{Attempt, Out, State, Steering, Strategy, MAX_INDICATIONS};
use beckon::server::udp_mapping::is_private;
use beckon::wire::rewrite::{endpoint, End};
use beckon::wire::trigger_packet::{build, Addressing};
use libfuzzer_sys::fuzz_target;
use rand::SeedableRng;
use smoltcp::wire::{Ipv4Packet, TcpPacket, TcpSeqNumber};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

const SERVER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 100), 40000);
const CAMERA: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 1, 10), 554);
const VIRT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 19, 128, 1), 554);
const NAT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 2), 31000);
const NAT2: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 2), 31001);
const STRANGER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 9), 31000);

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Addr {
    Server,
    Camera,
    Virt,
    Nat,
    Nat2,
    Stranger,
    ServerOtherPort(u16),
    Any(u32, u16),
}
impl Addr {
    fn get(self) -> SocketAddrV4 {
        match self {
            Addr::Server => SERVER,
            Addr::Camera => CAMERA,
            Addr::Virt => VIRT,
            Addr::Nat => NAT,
            Addr::Nat2 => NAT2,
            Addr::Stranger => STRANGER,
            Addr::ServerOtherPort(p) => SocketAddrV4::new(*SERVER.ip(), p),
            Addr::Any(a, p) => SocketAddrV4::new(a.into(), p),
        }
    }
}

/// Sequence numbers relative to what the attempt has seen, so the fuzzer can hit the checks.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Seq {
    Any(u32),
    /// The ISN of the last SYN the stack emitted, plus a small offset.
    StackIsn(i8),
    /// The seq of the last SYN-ACK from the wire, plus a small offset.
    WireSeq(i8),
}

#[derive(Arbitrary, Debug)]
enum Pkt {
    Raw(Vec<u8>),
    Tcp {
        src: Addr,
        dst: Addr,
        /// FIN SYN RST PSH ACK URG ECE CWR
        flags: u8,
        seq: Seq,
        ack: Seq,
        ttl: u8,
        options: u8,
        payload: Vec<u8>,
    },
}

#[derive(Arbitrary, Debug)]
enum Op {
    Wire(Pkt),
    Stack(Pkt),
    Tick(u16),
}

#[derive(Arbitrary, Debug)]
struct Input {
    strategy: u8,
    adjust: i8,
    seed: u64,
    ops: Vec<Op>,
}

struct Seen {
    stack_isn: u32,
    wire_seq: u32,
}

fn resolve(s: Seq, seen: &Seen) -> u32 {
    match s {
        Seq::Any(v) => v,
        Seq::StackIsn(o) => seen.stack_isn.wrapping_add(o as i32 as u32),
        Seq::WireSeq(o) => seen.wire_seq.wrapping_add(o as i32 as u32),
    }
}

/// Returns the packet and whether it is well-formed with valid checksums.
fn make(p: &Pkt, seen: &Seen) -> (Vec<u8>, bool) {
    match p {
        Pkt::Raw(b) => (b.clone(), false),
        Pkt::Tcp { src, dst, flags, seq, ack, ttl, options, payload } => {
            let (s, d) = (src.get(), dst.get());
            let opt = 4 * (*options as usize % 11);
            let hl = 20 + opt;
            let mut seg = vec![0u8; hl + payload.len().min(1400)];
            seg[hl..].copy_from_slice(&payload[..payload.len().min(1400)]);
            for b in &mut seg[20..hl] {
                *b = 1; // NOPs
            }
            {
                let mut t = TcpPacket::new_unchecked(&mut seg[..]);
                t.set_src_port(s.port());
                t.set_dst_port(d.port());
                t.set_seq_number(TcpSeqNumber(resolve(*seq, seen) as i32));
                t.set_ack_number(TcpSeqNumber(resolve(*ack, seen) as i32));
                t.set_header_len(hl as u8);
                t.set_window_len(64240);
            }
            seg[13] = *flags;
            let a = Addressing { proto: Proto::Tcp, src: *s.ip(), src_port: s.port(), dst: *d.ip(), dst_port: d.port() };
            let mut pkt = build(&a, &seg, 1).expect("well-formed test segment");
            let mut ip = Ipv4Packet::new_unchecked(&mut pkt[..]);
            ip.set_hop_limit(*ttl);
            ip.fill_checksum();
            (pkt, true)
        }
    }
}

fn tcp_view(p: &[u8]) -> Option<(bool, bool, u32)> {
    let ip = Ipv4Packet::new_checked(p).ok()?;
    let t = TcpPacket::new_checked(ip.payload()).ok()?;
    Some((t.syn(), t.ack(), t.seq_number().0 as u32))
}

fuzz_target!(|inp: Input| {
    let strategy = match inp.strategy % 5 {
        0 => Strategy::PatentSyn,
        1 => Strategy::ReverseSyn,
        2 => Strategy::SteeredResync(Steering::Ttl { adjust: 0 }),
        3 => Strategy::SteeredResync(Steering::Ttl { adjust: inp.adjust }),
        _ => Strategy::SteeredResync(Steering::Md5),
    };
    let t0 = Instant::now();
    let mut now = t0;
    let mut a = Attempt::new(strategy, SERVER, CAMERA, VIRT, now, Duration::from_secs(3));
    let mut rng = rand::rngs::StdRng::seed_from_u64(inp.seed);
    let out = a.start(now, &mut rng);
    let mut seen = Seen { stack_isn: 0, wire_seq: 0 };
    let mut public: Option<SocketAddrV4> = None;
    let mut stack_sane = true;
    check(&a, &out, None, &mut public, stack_sane);

    for op in inp.ops.iter().take(64) {
        let was_failed = a.failed().is_some();
        let was_established = a.state == State::Established;
        let (out, wire_src) = match op {
            Op::Wire(p) => {
                let (pkt, _) = make(p, &seen);
                let src = endpoint(&pkt, End::Src).ok();
                if let Some((true, true, seq)) = tcp_view(&pkt) {
                    seen.wire_seq = seq;
                }
                (a.from_wire(pkt, now), src)
            }
            Op::Stack(p) => {
                let (pkt, _) = make(p, &seen);
                if endpoint(&pkt, End::Src).ok() != Some(SERVER) {
                    stack_sane = false;
                }
                if let Some((true, false, seq)) = tcp_view(&pkt) {
                    seen.stack_isn = seq;
                }
                (a.from_stack(pkt, now), None)
            }
            Op::Tick(ms) => {
                now += Duration::from_millis(*ms as u64);
                (a.tick(now), None)
            }
        };
        if was_failed {
            // Only smoltcp's reset of a connection that failed after its handshake still goes
            // out, and only to the learned mapping.
            let after_handshake = a.established_at.is_some();
            assert!(
                out.iter().all(|o| after_handshake && matches!(o, Out::ToWire(p) if is_rst_to(p, a.public))),
                "a failed attempt emitted {out:?}"
            );
            assert!(a.failed().is_some(), "Failed is final");
        }
        if was_established && a.state != State::Established {
            // An established connection fails only when the camera stays silent after data.
            assert!(a.failed().is_some_and(|w| w.contains("nothing came back")), "Established left for {:?}", a.state);
        }
        check(&a, &out, wire_src, &mut public, stack_sane);
        let _ = a.poll_at();
    }
});

/// A TCP RST addressed to `public`.
fn is_rst_to(p: &[u8], public: Option<SocketAddrV4>) -> bool {
    let dst = endpoint(p, End::Dst).ok();
    let rst = Ipv4Packet::new_checked(p).ok().and_then(|ip| TcpPacket::new_checked(ip.payload()).ok().map(|t| t.rst())).unwrap_or(false);
    rst && dst.is_some() && dst == public
}

fn check(a: &Attempt, out: &[Out], wire_src: Option<SocketAddrV4>, public: &mut Option<SocketAddrV4>, stack_sane: bool) {
    // The learned mapping: never private, never replaced.
    if let Some(p) = a.public {
        assert!(!is_private(*p.ip()), "learned a private mapping {p}");
        if let Some(old) = *public {
            assert_eq!(old, p, "mapping changed from {old} to {p}");
        }
        *public = Some(p);
    } else {
        assert!(public.is_none(), "mapping forgotten");
    }
    assert!(a.indications <= 3 * MAX_INDICATIONS, "{} indications", a.indications);
    // Established sets established_at; it stays set only there or in a failure after the
    // handshake (a silent camera).
    assert_eq!(
        a.established_at.is_some(),
        a.state == State::Established || a.failed().is_some_and(|w| w.contains("nothing came back")),
        "{:?}",
        a.state
    );
    for o in out {
        match o {
            Out::ToStack(p) => {
                let src = wire_src.expect("only packets from the wire go to the stack");
                assert!(!is_private(*src.ip()), "a private source reached the stack");
                if a.public.is_none() {
                    // Known gap (reported with issue 5): patent-syn, before its SYN-ACK arrives,
                    // hands any non-SYN packet from any public source to smoltcp (and fails on
                    // any RST). Allowed here so the fuzzer keeps looking past it.
                    assert!(
                        a.strategy == Strategy::PatentSyn && a.state == State::AwaitSynAck,
                        "a packet reached the stack before any mapping was learned ({:?})",
                        a.state
                    );
                    let (syn, _, _) = tcp_view(p).expect("TCP");
                    assert!(!syn);
                } else {
                    assert_eq!(Some(src), a.public, "a packet not from the learned mapping reached the stack");
                }
                assert_eq!(endpoint(p, End::Src), Ok(VIRT));
                assert_eq!(endpoint(p, End::Dst), Ok(SERVER));
            }
            Out::ToWire(p) => {
                let to = a.public.expect("nothing leaves before the mapping is known");
                assert_eq!(endpoint(p, End::Dst), Ok(to), "a packet left for another address");
                if stack_sane {
                    assert_eq!(endpoint(p, End::Src), Ok(SERVER));
                }
            }
            Out::Indicate { to_server: true, pd1 } => {
                // The trigger will check it like this (docs/protocol.md).
                let ad = Addressing {
                    proto: Proto::Tcp,
                    src: *CAMERA.ip(),
                    src_port: CAMERA.port(),
                    dst: *SERVER.ip(),
                    dst_port: SERVER.port(),
                };
                build(&ad, pd1, 0).expect("reverse SYN passes the trigger's checks");
                let t = TcpPacket::new_checked(&pd1[..]).unwrap();
                assert!(t.syn() && !t.ack());
            }
            Out::Indicate { to_server: false, pd1 } => {
                let t = TcpPacket::new_checked(&pd1[..]).expect("a TCP segment");
                if stack_sane {
                    assert_eq!((t.src_port(), t.dst_port()), (SERVER.port(), CAMERA.port()));
                }
            }
            Out::Connect => {}
        }
    }
}
