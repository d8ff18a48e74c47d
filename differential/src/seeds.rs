//! Valid images, made by qemu-img and qemu-io in every configuration the
//! tests use: v2/v3, 512 B to 2 MiB clusters, refcount widths 1 to 64,
//! zlib and zstd compression, extended L2, snapshots, bitmaps,
//! preallocation, and resize / amend / commit / snapshot-delete workflows.

use std::path::{Path, PathBuf};
use std::process::Command;

/// One seed: a name and the commands that make `{img}` (with `{raw}` a
/// 2 MiB raw file of mixed data and `{tmp}` a scratch qcow2 path).
pub struct Seed {
    pub name: &'static str,
    pub steps: &'static [&'static str],
}

/// Guest writes shared by several seeds (qemu-io commands).
const WRITES: &str =
    "qemu-io -f qcow2 -c 'write -P 0xaa 0 64k' -c 'write -P 0x55 192k 8k' -c 'write -z 320k 64k' -c 'write -P 0x11 900k 4k' -c 'discard 192k 4k' {img}";

pub const SEEDS: &[Seed] = &[
    Seed { name: "v3-64k", steps: &["qemu-img create -q -f qcow2 {img} 1M", WRITES] },
    Seed {
        name: "v2-64k",
        steps: &["qemu-img create -q -f qcow2 -o compat=0.10 {img} 1M", WRITES],
    },
    Seed {
        name: "v3-512-rc1",
        steps: &[
            "qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=1 {img} 256k",
            "qemu-io -f qcow2 -c 'write -P 0xaa 0 3k' -c 'write -z 8k 2k' -c 'write -P 0x33 100k 1k' {img}",
        ],
    },
    Seed {
        name: "v3-4k-rc2",
        steps: &[
            "qemu-img create -q -f qcow2 -o cluster_size=4096,refcount_bits=2 {img} 1M",
            WRITES,
        ],
    },
    Seed {
        name: "v3-16k-rc4",
        steps: &[
            "qemu-img create -q -f qcow2 -o cluster_size=16384,refcount_bits=4 {img} 1M",
            WRITES,
        ],
    },
    Seed {
        name: "v3-32k-rc8",
        steps: &[
            "qemu-img create -q -f qcow2 -o cluster_size=32768,refcount_bits=8 {img} 1M",
            WRITES,
        ],
    },
    Seed {
        name: "v3-64k-rc32",
        steps: &["qemu-img create -q -f qcow2 -o refcount_bits=32 {img} 1M", WRITES],
    },
    Seed {
        name: "v3-2m-rc64",
        steps: &[
            "qemu-img create -q -f qcow2 -o cluster_size=2M,refcount_bits=64 {img} 4M",
            "qemu-io -f qcow2 -c 'write -P 0xaa 0 4k' -c 'write -z 2M 64k' {img}",
        ],
    },
    Seed {
        name: "zlib-4k",
        steps: &[
            "qemu-img convert -q -c -f raw -O qcow2 -o cluster_size=4096 {raw} {img}",
        ],
    },
    Seed {
        name: "zlib-512",
        steps: &[
            "qemu-img convert -q -c -f raw -O qcow2 -o cluster_size=512 {raw} {tmp}",
            "qemu-img resize -q --shrink -f qcow2 {tmp} 192k",
            "qemu-img convert -q -c -f qcow2 -O qcow2 -o cluster_size=512 {tmp} {img}",
        ],
    },
    Seed {
        name: "zlib-64k-v2",
        steps: &["qemu-img convert -q -c -f raw -O qcow2 -o compat=0.10 {raw} {img}"],
    },
    Seed {
        name: "zstd-64k",
        steps: &[
            "qemu-img convert -q -c -f raw -O qcow2 -o compression_type=zstd {raw} {img}",
        ],
    },
    Seed {
        name: "zstd-4k-rc1",
        steps: &[
            "qemu-img convert -q -c -f raw -O qcow2 -o compression_type=zstd,cluster_size=4096,refcount_bits=1 {raw} {img}",
        ],
    },
    Seed {
        name: "extl2-64k",
        steps: &[
            "qemu-img create -q -f qcow2 -o extended_l2=on {img} 1M",
            "qemu-io -f qcow2 -c 'write -P 0xaa 0 4k' -c 'write -P 0xbb 6k 2k' -c 'write -z 64k 8k' -c 'write -P 0xcc 130k 62k' -c 'write -z 200k 64k' -c 'discard 130k 2k' {img}",
        ],
    },
    Seed {
        name: "extl2-zstd-32k",
        steps: &[
            "qemu-img convert -q -c -f raw -O qcow2 -o extended_l2=on,cluster_size=32768,compression_type=zstd {raw} {tmp}",
            "qemu-img convert -q -f qcow2 -O qcow2 -o extended_l2=on,cluster_size=32768 {tmp} {img}",
            "qemu-io -f qcow2 -c 'write -P 0xdd 2k 1k' -c 'write -z 40k 1k' {img}",
        ],
    },
    Seed {
        name: "extl2-zstd-compressed",
        steps: &[
            "qemu-img convert -q -c -f raw -O qcow2 -o extended_l2=on,compression_type=zstd {raw} {img}",
        ],
    },
    Seed {
        name: "snapshots",
        steps: &[
            "qemu-img create -q -f qcow2 {img} 1M",
            "qemu-io -f qcow2 -c 'write -P 0xaa 0 128k' {img}",
            "qemu-img snapshot -c s1 {img}",
            "qemu-io -f qcow2 -c 'write -P 0xbb 64k 64k' -c 'write -z 0 4k' {img}",
            "qemu-img snapshot -c s2 {img}",
            "qemu-io -f qcow2 -c 'write -P 0xcc 512k 64k' {img}",
        ],
    },
    Seed {
        name: "snapshot-delete",
        steps: &[
            "qemu-img create -q -f qcow2 -o cluster_size=4096 {img} 1M",
            "qemu-io -f qcow2 -c 'write -P 0xaa 0 32k' {img}",
            "qemu-img snapshot -c s1 {img}",
            "qemu-io -f qcow2 -c 'write -P 0xbb 8k 8k' {img}",
            "qemu-img snapshot -c s2 {img}",
            "qemu-img snapshot -d s1 {img}",
        ],
    },
    Seed {
        name: "bitmaps",
        steps: &[
            "qemu-img create -q -f qcow2 {img} 1M",
            "qemu-io -f qcow2 -c 'write -P 0xaa 0 64k' {img}",
            "qemu-img bitmap --add {img} b0",
            "qemu-img bitmap --add -g 65536 {img} b1",
            "qemu-img bitmap --disable {img} b1",
        ],
    },
    Seed {
        name: "prealloc-metadata",
        steps: &[
            "qemu-img create -q -f qcow2 -o preallocation=metadata {img} 512k",
            "qemu-io -f qcow2 -c 'write -P 0xaa 64k 4k' {img}",
        ],
    },
    Seed {
        name: "prealloc-falloc-extl2",
        steps: &[
            "qemu-img create -q -f qcow2 -o preallocation=falloc,extended_l2=on {img} 256k",
        ],
    },
    Seed {
        name: "resize",
        steps: &[
            "qemu-img create -q -f qcow2 {img} 1M",
            WRITES,
            "qemu-img resize -q {img} 3M",
            "qemu-io -f qcow2 -c 'write -P 0x77 2M 64k' {img}",
            "qemu-img resize -q --shrink {img} 2304k",
        ],
    },
    Seed {
        name: "amend",
        steps: &[
            "qemu-img create -q -f qcow2 -o compat=0.10 {img} 1M",
            WRITES,
            "qemu-img amend -q -o compat=1.1,lazy_refcounts=on {img}",
            "qemu-img amend -q -o refcount_bits=4 {img}",
        ],
    },
    Seed {
        name: "commit",
        steps: &[
            "qemu-img create -q -f qcow2 {img} 1M",
            "qemu-io -f qcow2 -c 'write -P 0xaa 0 128k' {img}",
            "qemu-img create -q -f qcow2 -b {img} -F qcow2 {tmp}",
            "qemu-io -f qcow2 -c 'write -P 0xbb 64k 128k' -c 'write -z 0 8k' {tmp}",
            "qemu-img commit -q {tmp}",
        ],
    },
];

/// The 2 MiB raw file the compressed seeds convert: text, noise, zeros.
fn write_raw(path: &Path) -> std::io::Result<()> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut data = vec![0u8; 2 << 20];
    for (i, chunk) in data.chunks_mut(4096).enumerate() {
        match i % 5 {
            0 | 3 => {
                for (j, b) in chunk.iter_mut().enumerate() {
                    *b = b"qcow2-guard differential "[(j + i) % 25];
                }
            }
            1 => {
                for b in chunk.iter_mut() {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *b = x as u8;
                }
            }
            2 => {
                // Half noise, half text: compressible, not trivially.
                for (j, b) in chunk.iter_mut().enumerate() {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *b = if j % 2 == 0 { x as u8 } else { (j % 7) as u8 };
                }
            }
            _ => {}
        }
    }
    std::fs::write(path, data)
}

/// Make every seed (or the ones named in `only`) under `dir`; returns
/// (name, path, bytes).
pub fn make(dir: &Path, only: &[String]) -> Result<Vec<(String, PathBuf, Vec<u8>)>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let raw = dir.join("seed.raw");
    write_raw(&raw).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for s in SEEDS {
        if !only.is_empty() && !only.iter().any(|o| o == s.name) {
            continue;
        }
        let img = dir.join(format!("{}.qcow2", s.name));
        let tmp = dir.join(format!("{}.tmp.qcow2", s.name));
        let _ = std::fs::remove_file(&img);
        let _ = std::fs::remove_file(&tmp);
        for step in s.steps {
            let cmd = step
                .replace("{img}", &img.display().to_string())
                .replace("{tmp}", &tmp.display().to_string())
                .replace("{raw}", &raw.display().to_string());
            let o = Command::new("sh")
                .arg("-c")
                .arg(&cmd)
                .output()
                .map_err(|e| format!("{cmd}: {e}"))?;
            let stdout = String::from_utf8_lossy(&o.stdout);
            if !o.status.success() || stdout.contains("error") || stdout.contains("failed") {
                return Err(format!(
                    "seed {}: `{cmd}` failed: {stdout}{}",
                    s.name,
                    String::from_utf8_lossy(&o.stderr)
                ));
            }
        }
        let _ = std::fs::remove_file(&tmp);
        let bytes = std::fs::read(&img).map_err(|e| e.to_string())?;
        out.push((s.name.to_string(), img, bytes));
    }
    Ok(out)
}
