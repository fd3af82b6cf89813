//! Resource-report module (patent S3): the cameras on this LAN, their private IPs, device types
//! and the services those imply.

use crate::config::TriggerConfig;
use crate::wire::control::{CameraReport, Message, Probe};

pub fn report(cfg: &TriggerConfig, probe: Option<Probe>) -> Message {
    Message::Report {
        cameras: cfg
            .cameras
            .iter()
            .map(|c| CameraReport { name: c.name.clone(), ip: c.ip, device_type: c.device_type.clone(), services: c.services() })
            .collect(),
        probe,
    }
}
