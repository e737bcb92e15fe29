//! `--gpus 8xH200`, `2x8xH100`, `8x96GiB` or `cpu`: how many devices, how much memory each.

use crate::{PlanError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Gpu,
    /// The host's RAM, one rank.
    Cpu,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hardware {
    pub name: String,
    pub kind: DeviceKind,
    /// Devices in all (ranks).
    pub devices: usize,
    /// Devices per node (TP groups wider than this cross the network).
    pub per_node: usize,
    /// Memory of one device.
    pub device_bytes: u64,
}

const MIB: u64 = 1 << 20;

/// Total memory per device as `nvidia-smi` / `rocm-smi` report it, in MiB.
pub const GPUS: &[(&str, u64)] = &[
    ("H100", 81559),
    ("H100-NVL", 95830),
    ("H200", 143771),
    ("H20", 97871),
    ("A100-80G", 81920),
    ("A100-40G", 40960),
    ("B200", 183359),
    ("L40S", 46068),
    ("RTX4090", 24564),
    ("MI300X", 196608),
];

/// GPUs per node when `--gpus` does not say (`NODESxCOUNTxGPU` does).
pub const DEFAULT_GPUS_PER_NODE: usize = 8;

/// `768GiB`, `141GB`, `1.5TiB`, `1073741824`.
pub fn parse_size(s: &str) -> Option<u64> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num.trim().parse().ok()?;
    let mult: f64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "kib" => 1024.0,
        "mb" => 1e6,
        "mib" => MIB as f64,
        "gb" => 1e9,
        "gib" => (1u64 << 30) as f64,
        "tb" => 1e12,
        "tib" => (1u64 << 40) as f64,
        _ => return None,
    };
    (v.is_finite() && v > 0.0).then_some((v * mult) as u64)
}

/// MemTotal of /proc/meminfo.
pub fn host_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = info.lines().find(|l| l.starts_with("MemTotal:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

impl Hardware {
    /// Parse `--gpus`; `ram` (bytes) sizes a `cpu` host (default: MemTotal).
    pub fn parse(spec: &str, ram: Option<u64>) -> Result<Self> {
        let err = |msg: String| PlanError::Gpus { spec: spec.to_string(), msg };
        if spec.trim().eq_ignore_ascii_case("cpu") {
            let bytes = ram.or_else(host_memory).ok_or_else(|| err("no /proc/meminfo: give the size with --ram".into()))?;
            return Ok(Hardware {
                name: "CPU host RAM".into(),
                kind: DeviceKind::Cpu,
                devices: 1,
                per_node: 1,
                device_bytes: bytes,
            });
        }
        // leading `COUNTx` prefixes, then the GPU name or size (which may itself contain an x: MI300X)
        let mut rest = spec.trim();
        let mut counts = Vec::new();
        loop {
            let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
            match rest[digits..].strip_prefix(['x', 'X', '\u{d7}']) {
                Some(after) if digits > 0 => {
                    counts.push(&rest[..digits]);
                    rest = after;
                }
                _ => break,
            }
        }
        let shape = "expected COUNTxGPU (8xH200), NODESxCOUNTxGPU (2x8xH100), COUNTxSIZE (8x96GiB) or cpu";
        let (nodes, per_node, kind) = match counts[..] {
            [n] => (None, n, rest),
            [m, n] => (Some(m), n, rest),
            _ => return Err(err(shape.into())),
        };
        let count = |s: &str| s.parse::<usize>().ok().filter(|&n| n > 0).ok_or_else(|| err(format!("`{s}`: {shape}")));
        let per_node_n = count(per_node)?;
        let (devices, per_node) = match nodes {
            Some(m) => (count(m)? * per_node_n, per_node_n),
            None => (per_node_n, per_node_n.min(DEFAULT_GPUS_PER_NODE)),
        };
        let kind = kind.trim();
        let (name, device_bytes) = match GPUS.iter().find(|(n, _)| n.eq_ignore_ascii_case(kind) || alias(kind) == Some(*n)) {
            Some((n, mib)) => (n.to_string(), mib * MIB),
            None => match parse_size(kind) {
                Some(b) => (kind.to_string(), b),
                None => {
                    let known: Vec<&str> = GPUS.iter().map(|(n, _)| *n).collect();
                    return Err(err(format!(
                        "unknown GPU `{kind}` (known: {}; or a memory size such as 96GiB)",
                        known.join(", ")
                    )));
                }
            },
        };
        Ok(Hardware { name, kind: DeviceKind::Gpu, devices, per_node, device_bytes })
    }

    pub fn nodes(&self) -> usize {
        self.devices.div_ceil(self.per_node)
    }

    /// `8 × H200 (140.4 GiB each), 1 node` / `CPU host RAM: 755.0 GiB`.
    pub fn describe(&self) -> String {
        let gib = self.device_bytes as f64 / (1u64 << 30) as f64;
        match self.kind {
            DeviceKind::Cpu => format!("{}: {gib:.1} GiB", self.name),
            DeviceKind::Gpu => {
                let nodes = self.nodes();
                let layout = if nodes == 1 { "1 node".to_string() } else { format!("{nodes} nodes of {}", self.per_node) };
                format!("{} × {} ({gib:.1} GiB each), {layout}", self.devices, self.name)
            }
        }
    }
}

fn alias(kind: &str) -> Option<&'static str> {
    Some(match kind.to_ascii_lowercase().as_str() {
        "h100-80g" | "h100-sxm" | "h100-pcie" | "h800" => "H100",
        "h200-141g" | "h200-sxm" | "h20-141g" => "H200",
        "a100" | "a100-80gb" | "a800" => "A100-80G",
        "a100-40gb" => "A100-40G",
        "b200-192g" => "B200",
        "4090" => "RTX4090",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_gpu_specs() {
        let h = Hardware::parse("8xH200", None).unwrap();
        assert_eq!((h.devices, h.per_node, h.nodes(), h.device_bytes), (8, 8, 1, 143771 * MIB));
        let h = Hardware::parse("16xh100", None).unwrap();
        assert_eq!((h.devices, h.nodes()), (16, 2));
        let h = Hardware::parse("2x4xA100-80G", None).unwrap();
        assert_eq!((h.devices, h.per_node, h.nodes()), (8, 4, 2));
        assert_eq!(Hardware::parse("4x96GiB", None).unwrap().device_bytes, 96 << 30);
        let c = Hardware::parse("cpu", Some(768 << 30)).unwrap();
        assert_eq!((c.kind, c.devices, c.device_bytes), (DeviceKind::Cpu, 1, 768 << 30));
        let e = Hardware::parse("8xFOO", None).unwrap_err().to_string();
        assert!(e.contains("FOO") && e.contains("H200"), "{e}");
        assert!(Hardware::parse("0xH100", None).is_err() && Hardware::parse("H100", None).is_err());
        assert_eq!(Hardware::parse("8xMI300X", None).unwrap().name, "MI300X");
    }
}
