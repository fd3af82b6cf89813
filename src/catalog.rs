//! Device-type catalog: a camera's device type implies the ports it serves (the patent's
//! "device type" field). Built in, extendable per camera with `ports = [...]` in trigger.toml.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Transport protocol of a camera service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

impl FromStr for Proto {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            other => Err(format!("unknown protocol {other:?}, expected \"tcp\" or \"udp\"")),
        }
    }
}

/// One camera service: protocol and port, written `tcp/554` in configs and frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Service {
    pub proto: Proto,
    pub port: u16,
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.proto, self.port)
    }
}

impl FromStr for Service {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (proto, port) = s.split_once('/').ok_or_else(|| format!("service {s:?} must look like \"tcp/554\" or \"udp/5060\""))?;
        let proto = proto.parse()?;
        let port: u16 = port.parse().map_err(|_| format!("service {s:?}: port must be a number 1-65535"))?;
        if port == 0 {
            return Err(format!("service {s:?}: port 0 is not a service port"));
        }
        Ok(Service { proto, port })
    }
}

impl Serialize for Service {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Service {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The built-in device types and their ports (vendors publish these in their SDK docs).
pub const BUILTIN: &[(&str, &[&str])] = &[
    ("generic-rtsp", &["tcp/554"]),
    ("onvif", &["tcp/80"]),
    ("hikvision", &["tcp/8000", "tcp/554", "tcp/80"]),
    ("dahua", &["tcp/37777", "tcp/554", "tcp/80"]),
    ("uniview", &["tcp/554", "tcp/80"]),
    ("gb28181", &["udp/5060"]),
    // A device whose services are all listed explicitly with `ports = [...]`.
    ("generic", &[]),
];

/// Ports implied by a device type, or `None` for an unknown type.
pub fn ports_of(device_type: &str) -> Option<Vec<Service>> {
    BUILTIN
        .iter()
        .find(|(name, _)| *name == device_type)
        .map(|(_, ports)| ports.iter().map(|p| p.parse().expect("built-in catalog entries are valid")).collect())
}

/// Names of all known device types, for error messages.
pub fn known_types() -> String {
    BUILTIN.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_round_trip() {
        let s: Service = "udp/5060".parse().unwrap();
        assert_eq!(s, Service { proto: Proto::Udp, port: 5060 });
        assert_eq!(s.to_string(), "udp/5060");
        assert!("udp5060".parse::<Service>().is_err());
        assert!("sctp/1".parse::<Service>().is_err());
        assert!("tcp/0".parse::<Service>().is_err());
        assert!("tcp/70000".parse::<Service>().is_err());
    }

    #[test]
    fn catalog_has_the_documented_types() {
        assert_eq!(ports_of("gb28181").unwrap()[0].to_string(), "udp/5060");
        assert_eq!(ports_of("hikvision").unwrap().len(), 3);
        assert!(ports_of("toaster").is_none());
    }
}
