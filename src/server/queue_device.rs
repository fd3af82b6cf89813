//! A smoltcp `phy::Device` over two packet queues. smoltcp stays sans-IO: the async shell
//! (a TCP shard) fills `rx` with packets from the TUN and drains `tx` into it.

use smoltcp::phy::{Checksum, Device, DeviceCapabilities, Medium};
use std::collections::VecDeque;

/// Packets smoltcp may queue for transmission before the shell drains them.
const TX_QUEUE: usize = 4096;
/// The camera-facing path's MTU (the TUN's).
pub const MTU: usize = 1500;

#[derive(Default)]
pub struct QueueDevice {
    pub rx: VecDeque<Vec<u8>>,
    pub tx: VecDeque<Vec<u8>>,
}

pub struct RxTok(Vec<u8>);
pub struct TxTok<'a>(&'a mut VecDeque<Vec<u8>>);

impl smoltcp::phy::RxToken for RxTok {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let r = f(&self.0);
        // smoltcp has copied what it keeps: a TUN read buffer goes back to the reader's pool.
        super::rx_pool::give(self.0);
        r
    }
}

impl smoltcp::phy::TxToken for TxTok<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0u8; len];
        let r = f(&mut buf);
        self.0.push_back(buf);
        r
    }
}

impl Device for QueueDevice {
    type RxToken<'a> = RxTok;
    type TxToken<'a> = TxTok<'a>;
    fn receive(&mut self, _t: smoltcp::time::Instant) -> Option<(RxTok, TxTok<'_>)> {
        let p = self.rx.pop_front()?;
        Some((RxTok(p), TxTok(&mut self.tx)))
    }
    fn transmit(&mut self, _t: smoltcp::time::Instant) -> Option<TxTok<'_>> {
        (self.tx.len() < TX_QUEUE).then_some(TxTok(&mut self.tx))
    }
    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ip;
        c.max_transmission_unit = MTU;
        // The TUN reader verified (or the kernel did) every TCP checksum before dispatch; a TCP
        // super-packet's checksum field is only partial, so smoltcp must not check it again.
        c.checksum.tcp = Checksum::Tx;
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
    use smoltcp::socket::tcp;
    use smoltcp::time::Instant;
    use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr};

    struct Host {
        iface: Interface,
        dev: QueueDevice,
        sockets: SocketSet<'static>,
        handle: SocketHandle,
    }

    fn host(ip: [u8; 4], rx: usize) -> Host {
        let mut dev = QueueDevice::default();
        let mut iface = Interface::new(Config::new(HardwareAddress::Ip), &mut dev, Instant::from_millis(0));
        iface.update_ip_addrs(|a| a.push(IpCidr::new(IpAddress::v4(ip[0], ip[1], ip[2], ip[3]), 24)).unwrap());
        let mut sockets = SocketSet::new(Vec::new());
        let mut sock = tcp::Socket::new(tcp::SocketBuffer::new(vec![0; rx]), tcp::SocketBuffer::new(vec![0; 4096]));
        // As the shards run it (and the clock stands still here: no delayed ACK would fire).
        sock.set_ack_delay(None);
        sock.set_nagle_enabled(false);
        let handle = sockets.add(sock);
        Host { iface, dev, sockets, handle }
    }

    impl Host {
        fn sock(&mut self) -> &mut tcp::Socket<'static> {
            self.sockets.get_mut(self.handle)
        }
    }

    /// Poll both hosts and carry their packets across until neither has anything to say.
    fn shuttle(a: &mut Host, b: &mut Host) {
        for _ in 0..50 {
            a.iface.poll(Instant::from_millis(0), &mut a.dev, &mut a.sockets);
            b.iface.poll(Instant::from_millis(0), &mut b.dev, &mut b.sockets);
            if a.dev.tx.is_empty() && b.dev.tx.is_empty() {
                return;
            }
            b.dev.rx.extend(a.dev.tx.drain(..));
            a.dev.rx.extend(b.dev.tx.drain(..));
        }
        panic!("the two stacks kept talking");
    }

    /// The patched smoltcp (vendor/smoltcp/BECKON-PATCH.md): a receive ring that was drained
    /// takes the next bytes at its front, so a reader that keeps up touches only the ring's
    /// first pages; bytes that are still buffered stay where they are.
    #[test]
    fn drained_receive_ring_restarts_at_its_front() {
        let (mut server, mut client) = (host([198, 18, 0, 1], 1000), host([198, 18, 0, 2], 1000));
        server.sock().listen(80).unwrap();
        let cx = client.iface.context();
        client.sockets.get_mut::<tcp::Socket>(client.handle).connect(cx, (IpAddress::v4(198, 18, 0, 1), 80), 40000).unwrap();
        shuttle(&mut client, &mut server);
        assert_eq!(server.sock().state(), tcp::State::Established);

        // 900 bytes, read at once: the ring is empty again, its read position at 900.
        assert_eq!(client.sock().send_slice(&[1; 900]).unwrap(), 900);
        shuttle(&mut client, &mut server);
        assert_eq!(server.sock().recv(|b| (b.len(), b.len())).unwrap(), 900);

        // The next 500 bytes are contiguous: written at the front, not 100 at the end + 400.
        assert_eq!(client.sock().send_slice(&[2; 500]).unwrap(), 500);
        shuttle(&mut client, &mut server);
        assert_eq!(server.sock().recv(|b| (b.len(), b.to_vec())).unwrap(), vec![2; 500]);

        // While bytes are buffered nothing moves: 300 + 300 arrive in order behind each other.
        let data: Vec<u8> = (0..600).map(|i| (i % 251) as u8).collect();
        assert_eq!(client.sock().send_slice(&data[..300]).unwrap(), 300);
        shuttle(&mut client, &mut server);
        assert_eq!(client.sock().send_slice(&data[300..]).unwrap(), 300);
        shuttle(&mut client, &mut server);
        let mut got = vec![0; 1000];
        let n = server.sock().recv_slice(&mut got).unwrap();
        assert_eq!(&got[..n], &data[..]);

        // Out of order, with the read position away from the front: A is buffered, C arrives
        // before B, A is read (the ring is empty, C waits out of order), then B comes. C must
        // stay where it was put: the ring starts again at its front only when nothing waits.
        assert_eq!(client.sock().send_slice(&[3; 100]).unwrap(), 100);
        shuttle(&mut client, &mut server);
        let mut segment = |fill: u8| {
            assert_eq!(client.sock().send_slice(&[fill; 100]).unwrap(), 100);
            client.iface.poll(Instant::from_millis(0), &mut client.dev, &mut client.sockets);
            assert_eq!(client.dev.tx.len(), 1);
            client.dev.tx.pop_front().unwrap()
        };
        let (b, c) = (segment(4), segment(5));
        server.dev.rx.push_back(c);
        server.iface.poll(Instant::from_millis(0), &mut server.dev, &mut server.sockets);
        server.dev.tx.clear(); // its duplicate ACK
        assert_eq!(server.sock().recv(|b| (b.len(), b.to_vec())).unwrap(), vec![3; 100]);
        server.dev.rx.push_back(b);
        shuttle(&mut client, &mut server);
        let n = server.sock().recv_slice(&mut got).unwrap();
        assert_eq!(&got[..n], [[4; 100], [5; 100]].concat());
    }
}
