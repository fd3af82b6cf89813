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
