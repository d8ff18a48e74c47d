//! Valid images, made by qemu-img and qemu-io in every configuration the
//! tests use: v2/v3, 512 B to 2 MiB clusters, refcount widths 1 to 64,
//! zlib and zstd compression, extended L2, snapshots, bitmaps,
//! preallocation, and resize / amend / commit / snapshot-delete workflows,
//! external data files (plain and raw) and backing files.

use std::path::{Path, PathBuf};
use std::process::Command;

/// One seed: a name and the commands that make `{img}` (with `{raw}` a
/// 2 MiB raw file of mixed data, `{tmp}` a scratch qcow2 path, and
/// `{data}` / `{base}` an external data file and a backing image that
/// stay next to the seed), plus what our commands need to accept it.
pub struct Seed {
    pub name: &'static str,
    pub steps: &'static [&'static str],
    /// Policy flags for every command of ours (`--allow-data-file`).
    pub policy: &'static [&'static str],
    /// Files handed to our `convert` (`--data-file {data}`), which never
    /// opens what the image names.
    pub convert: &'static [&'static str],
    /// The same files handed to qemu-img, as `--image-opts` options
    /// (`data-file.filename={data}`). When set, both hand-ins happen only
    /// for mutants that still say they have an external data file
    /// (incompatible bit 2), as a caller who supplies the file an image
    /// needs: QEMU refuses `data-file` for an image without one, and
    /// without it refuses an image that has one but names none.
    pub qemu: &'static [&'static str],
}

/// A seed with no policy flags.
const fn plain(name: &'static str, steps: &'static [&'static str]) -> Seed {
    Seed {
        name,
        steps,
        policy: &[],
        convert: &[],
        qemu: &[],
    }
}

/// Guest writes shared by several seeds (qemu-io commands).
const WRITES: &str =
    "qemu-io -f qcow2 -c 'write -P 0xaa 0 64k' -c 'write -P 0x55 192k 8k' -c 'write -z 320k 64k' -c 'write -P 0x11 900k 4k' -c 'discard 192k 4k' {img}";

pub const SEEDS: &[Seed] = &[
    plain("v3-64k", &["qemu-img create -q -f qcow2 {img} 1M", WRITES]),
    plain("v2-64k", &["qemu-img create -q -f qcow2 -o compat=0.10 {img} 1M", WRITES]),
    plain("v3-512-rc1", &[
            "qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=1 {img} 256k",
            "qemu-io -f qcow2 -c 'write -P 0xaa 0 3k' -c 'write -z 8k 2k' -c 'write -P 0x33 100k 1k' {img}",
        ]),
    plain("v3-4k-rc2", &[
            "qemu-img create -q -f qcow2 -o cluster_size=4096,refcount_bits=2 {img} 1M",
            WRITES,
        ]),
    plain("v3-16k-rc4", &[
            "qemu-img create -q -f qcow2 -o cluster_size=16384,refcount_bits=4 {img} 1M",
            WRITES,
        ]),
    plain("v3-32k-rc8", &[
            "qemu-img create -q -f qcow2 -o cluster_size=32768,refcount_bits=8 {img} 1M",
            WRITES,
        ]),
    plain("v3-64k-rc32", &["qemu-img create -q -f qcow2 -o refcount_bits=32 {img} 1M", WRITES]),
    plain("v3-2m-rc64", &[
            "qemu-img create -q -f qcow2 -o cluster_size=2M,refcount_bits=64 {img} 4M",
            "qemu-io -f qcow2 -c 'write -P 0xaa 0 4k' -c 'write -z 2M 64k' {img}",
        ]),
    plain("zlib-4k", &[
            "qemu-img convert -q -c -f raw -O qcow2 -o cluster_size=4096 {raw} {img}",
        ]),
    plain("zlib-512", &[
            "qemu-img convert -q -c -f raw -O qcow2 -o cluster_size=512 {raw} {tmp}",
            "qemu-img resize -q --shrink -f qcow2 {tmp} 192k",
            "qemu-img convert -q -c -f qcow2 -O qcow2 -o cluster_size=512 {tmp} {img}",
        ]),
    plain("zlib-64k-v2", &["qemu-img convert -q -c -f raw -O qcow2 -o compat=0.10 {raw} {img}"]),
    plain("zstd-64k", &[
            "qemu-img convert -q -c -f raw -O qcow2 -o compression_type=zstd {raw} {img}",
        ]),
    plain("zstd-4k-rc1", &[
            "qemu-img convert -q -c -f raw -O qcow2 -o compression_type=zstd,cluster_size=4096,refcount_bits=1 {raw} {img}",
        ]),
    plain("extl2-64k", &[
            "qemu-img create -q -f qcow2 -o extended_l2=on {img} 1M",
            "qemu-io -f qcow2 -c 'write -P 0xaa 0 4k' -c 'write -P 0xbb 6k 2k' -c 'write -z 64k 8k' -c 'write -P 0xcc 130k 62k' -c 'write -z 200k 64k' -c 'discard 130k 2k' {img}",
        ]),
    plain("extl2-zstd-32k", &[
            "qemu-img convert -q -c -f raw -O qcow2 -o extended_l2=on,cluster_size=32768,compression_type=zstd {raw} {tmp}",
            "qemu-img convert -q -f qcow2 -O qcow2 -o extended_l2=on,cluster_size=32768 {tmp} {img}",
            "qemu-io -f qcow2 -c 'write -P 0xdd 2k 1k' -c 'write -z 40k 1k' {img}",
        ]),
    plain("extl2-zstd-compressed", &[
            "qemu-img convert -q -c -f raw -O qcow2 -o extended_l2=on,compression_type=zstd {raw} {img}",
        ]),
    plain("snapshots", &[
            "qemu-img create -q -f qcow2 {img} 1M",
            "qemu-io -f qcow2 -c 'write -P 0xaa 0 128k' {img}",
            "qemu-img snapshot -c s1 {img}",
            "qemu-io -f qcow2 -c 'write -P 0xbb 64k 64k' -c 'write -z 0 4k' {img}",
            "qemu-img snapshot -c s2 {img}",
            "qemu-io -f qcow2 -c 'write -P 0xcc 512k 64k' {img}",
        ]),
    plain("snapshot-delete", &[
            "qemu-img create -q -f qcow2 -o cluster_size=4096 {img} 1M",
            "qemu-io -f qcow2 -c 'write -P 0xaa 0 32k' {img}",
            "qemu-img snapshot -c s1 {img}",
            "qemu-io -f qcow2 -c 'write -P 0xbb 8k 8k' {img}",
            "qemu-img snapshot -c s2 {img}",
            "qemu-img snapshot -d s1 {img}",
        ]),
    plain("bitmaps", &[
            "qemu-img create -q -f qcow2 {img} 1M",
            "qemu-io -f qcow2 -c 'write -P 0xaa 0 64k' {img}",
            "qemu-img bitmap --add {img} b0",
            "qemu-img bitmap --add -g 65536 {img} b1",
            "qemu-img bitmap --disable {img} b1",
        ]),
    plain("prealloc-metadata", &[
            "qemu-img create -q -f qcow2 -o preallocation=metadata {img} 512k",
            "qemu-io -f qcow2 -c 'write -P 0xaa 64k 4k' {img}",
        ]),
    plain("prealloc-falloc-extl2", &[
            "qemu-img create -q -f qcow2 -o preallocation=falloc,extended_l2=on {img} 256k",
        ]),
    plain("resize", &[
            "qemu-img create -q -f qcow2 {img} 1M",
            WRITES,
            "qemu-img resize -q {img} 3M",
            "qemu-io -f qcow2 -c 'write -P 0x77 2M 64k' {img}",
            "qemu-img resize -q --shrink {img} 2304k",
        ]),
    plain("amend", &[
            "qemu-img create -q -f qcow2 -o compat=0.10 {img} 1M",
            WRITES,
            "qemu-img amend -q -o compat=1.1,lazy_refcounts=on {img}",
            "qemu-img amend -q -o refcount_bits=4 {img}",
        ]),
    plain("commit", &[
            "qemu-img create -q -f qcow2 {img} 1M",
            "qemu-io -f qcow2 -c 'write -P 0xaa 0 128k' {img}",
            "qemu-img create -q -f qcow2 -b {img} -F qcow2 {tmp}",
            "qemu-io -f qcow2 -c 'write -P 0xbb 64k 128k' -c 'write -z 0 8k' {tmp}",
            "qemu-img commit -q {tmp}",
        ]),
    Seed {
        name: "data-file",
        steps: &["qemu-img create -q -f qcow2 -o data_file={data} {img} 1M", WRITES],
        policy: &["--allow-data-file"],
        convert: &["--data-file", "{data}"],
        qemu: &["data-file.driver=file,data-file.filename={data}"],
    },
    Seed {
        name: "data-file-raw",
        steps: &[
            "qemu-img create -q -f qcow2 -o data_file={data},data_file_raw=on,cluster_size=4096 {img} 1M",
            WRITES,
        ],
        policy: &["--allow-data-file"],
        convert: &["--data-file", "{data}"],
        qemu: &["data-file.driver=file,data-file.filename={data}"],
    },
    Seed {
        name: "backing",
        steps: &[
            "qemu-img create -q -f qcow2 {base} 1M",
            "qemu-io -f qcow2 -c 'write -P 0x99 0 1M' {base}",
            "qemu-img create -q -f qcow2 -b {base} -F qcow2 -o cluster_size=16384 {img}",
            "qemu-io -f qcow2 -c 'write -P 0xaa 16k 20k' -c 'write -z 128k 32k' -c 'discard 512k 64k' {img}",
        ],
        policy: &["--allow-backing"],
        convert: &["--backing", "{base}"],
        qemu: &[],
    },
    plain(
        "v2-snapshots",
        &[
            "qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=4096 {img} 1M",
            "qemu-io -f qcow2 -c 'write -P 0xaa 0 48k' {img}",
            "qemu-img snapshot -c s1 {img}",
            "qemu-io -f qcow2 -c 'write -P 0xbb 8k 8k' -c 'write -P 0 40k 4k' {img}",
            "qemu-img snapshot -c s2 {img}",
            "qemu-io -f qcow2 -c 'write -P 0xcc 4k 8k' {img}",
        ],
    ),
    plain(
        "zlib-16k-rc1",
        &["qemu-img convert -q -c -f raw -O qcow2 -o cluster_size=16384,refcount_bits=1 {raw} {img}"],
    ),
    plain(
        "zstd-512",
        &[
            "qemu-img convert -q -c -f raw -O qcow2 -o cluster_size=512,compression_type=zstd {raw} {tmp}",
            "qemu-img resize -q --shrink -f qcow2 {tmp} 192k",
            "qemu-img convert -q -c -f qcow2 -O qcow2 -o cluster_size=512,compression_type=zstd {tmp} {img}",
        ],
    ),
    plain(
        "zstd-4k-snapshot",
        &[
            "qemu-img convert -q -c -f raw -O qcow2 -o compression_type=zstd,cluster_size=4096 {raw} {img}",
            "qemu-img snapshot -c s1 {img}",
            "qemu-io -f qcow2 -c 'write -P 0xee 8k 12k' -c 'write -z 64k 8k' {img}",
        ],
    ),
    plain(
        "extl2-snapshot",
        &[
            "qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=32768 {img} 1M",
            "qemu-io -f qcow2 -c 'write -P 0xaa 0 40k' -c 'write -P 0xbb 100k 3k' {img}",
            "qemu-img snapshot -c s1 {img}",
            "qemu-io -f qcow2 -c 'write -P 0xcc 2k 2k' -c 'write -z 100k 1k' {img}",
        ],
    ),
    plain(
        "bitmaps-resize",
        &[
            "qemu-img create -q -f qcow2 {img} 1M",
            "qemu-io -f qcow2 -c 'write -P 0xaa 0 64k' {img}",
            "qemu-img bitmap --add {img} b0",
            "qemu-img resize -q {img} 3M",
            "qemu-io -f qcow2 -c 'write -P 0x77 2M 64k' {img}",
            "qemu-img bitmap --add -g 131072 {img} b1",
            "qemu-img resize -q --shrink {img} 2304k",
        ],
    ),
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

/// A made seed: the image, its bytes, and the arguments our commands
/// need for it (placeholders replaced).
pub struct Made {
    pub name: String,
    pub path: PathBuf,
    pub bytes: Vec<u8>,
    pub policy: Vec<String>,
    pub convert: Vec<String>,
    pub qemu: Vec<String>,
}

/// Make every seed (or the ones named in `only`) under `dir`.
pub fn make(dir: &Path, only: &[String]) -> Result<Vec<Made>, String> {
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
        let data = dir.join(format!("{}.data", s.name));
        let base = dir.join(format!("{}.base.qcow2", s.name));
        for p in [&img, &tmp, &data, &base] {
            let _ = std::fs::remove_file(p);
        }
        let fill = |t: &str| {
            t.replace("{img}", &img.display().to_string())
                .replace("{tmp}", &tmp.display().to_string())
                .replace("{raw}", &raw.display().to_string())
                .replace("{data}", &data.display().to_string())
                .replace("{base}", &base.display().to_string())
        };
        for step in s.steps {
            let cmd = fill(step);
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
        out.push(Made {
            name: s.name.to_string(),
            bytes,
            policy: s.policy.iter().map(|a| fill(a)).collect(),
            convert: s.convert.iter().map(|a| fill(a)).collect(),
            qemu: s.qemu.iter().map(|a| fill(a)).collect(),
            path: img,
        });
    }
    Ok(out)
}
