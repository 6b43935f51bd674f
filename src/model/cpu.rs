//! Which CPU kernels carry the products against frozen weights: chosen once per process, at run
//! time, from what this CPU has (not from cargo features), and overridable so that every path can
//! be tested and benchmarked on one machine.
//!
//! - `amx`: Intel AMX tiles ([`super::amx`]), where the CPU has AMX-BF16 and Linux grants the tile
//!   state.
//! - `avx512-bf16`: weights held as bf16 pairs ([`super::pairs`]), products by `vdpbf16ps` with the
//!   other operand split into `hi + lo` (two bf16s); where the CPU has AVX512_BF16.
//! - `avx512`: the same bf16-pair weights, widened to f32 in registers and multiplied by AVX-512
//!   FMA; where the CPU has AVX-512F.
//! - `f32`: f32 weights and the `gemm` crate's kernels (AVX-512 or AVX2/FMA, picked by gemm itself
//!   at run time); everywhere, and the only path off x86_64.
//!
//! `RERANKD_KERNEL=amx|avx512-bf16|avx512|f32` asks for one (`auto` or unset: the best this CPU
//! has); a path the CPU lacks is refused with a warning and the best available taken instead.
//! `RERANKD_AMX=off` (the older switch) rules out `amx`. The choice is logged once and reported by
//! `rerankd bench` and `rerankd doctor`.

use std::sync::OnceLock;

/// The precision of the products against frozen weights that a process asks for, before it
/// loads a model: `f32` (the default: every kernel path within the fixture tolerances), or
/// `bf16`, opt-in for scoring (`serve --precision bf16`, `score --precision bf16`): the activation
/// rounded to bf16 and multiplied by `vdpbf16ps` against the bf16 weight with f32 sums, one
/// instruction per pair where the exact split takes two. Only where the CPU has AVX512_BF16;
/// training always runs `f32`. Its effect on scores and rankings: docs/performance.md.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        crate::settings::spelled(s)
    }
}

static BF16: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Asks for `p` for the frozen weights packed from now on (a model loaded after this call).
/// Refuses `bf16` where the CPU cannot run it, or where `RERANKD_KERNEL=f32` asked for gemm.
pub fn set_precision(p: Precision) -> Result<(), String> {
    if p == Precision::Bf16 {
        if let Some(why) = Kernel::Avx512Bf16.unavailable() {
            return Err(format!("--precision bf16 needs AVX512_BF16: {why}"));
        }
        if chosen() == Kernel::F32 {
            return Err("--precision bf16 with RERANKD_KERNEL=f32: the f32 path has no bf16 products".into());
        }
    }
    BF16.store(p == Precision::Bf16, std::sync::atomic::Ordering::SeqCst);
    Ok(())
}

/// The precision frozen weights are packed for now.
pub fn precision() -> Precision {
    if BF16.load(std::sync::atomic::Ordering::SeqCst) { Precision::Bf16 } else { Precision::F32 }
}

/// A kernel path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    Amx,
    Avx512Bf16,
    Avx512,
    F32,
}

impl Kernel {
    /// Best first, as measured (`cargo bench --bench kernels`, docs/performance.md): on an AMD EPYC
    /// (Zen 4) `avx512` and `avx512-bf16` ran the layer's products at the same 175-212 GFLOP/s
    /// (`vdpbf16ps` does twice an FMA's multiply-adds, and the split operand needs two of them),
    /// so `avx512`, the exact f32 product with no split pass, comes first; both ran 1.1-3x
    /// faster than `f32` (gemm packs the weight per call, which few rows do not repay).
    pub const ALL: [Kernel; 4] = [Kernel::Amx, Kernel::Avx512, Kernel::Avx512Bf16, Kernel::F32];

    /// The name `RERANKD_KERNEL` takes and reports print.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Amx => "amx",
            Kernel::Avx512Bf16 => "avx512-bf16",
            Kernel::Avx512 => "avx512",
            Kernel::F32 => "f32",
        }
    }

    pub fn parse(s: &str) -> Option<Kernel> {
        Kernel::ALL.into_iter().find(|k| k.name() == s)
    }

    /// Why this process cannot run this path, if it cannot.
    pub fn unavailable(self) -> Option<String> {
        match self {
            Kernel::F32 => None,
            #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
            Kernel::Amx => amx_unusable().map(str::to_string),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Bf16 if !std::is_x86_feature_detected!("avx512bf16") => {
                Some("this CPU has no AVX512_BF16".into())
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Bf16 | Kernel::Avx512 => {
                let f = std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bw");
                (!f).then(|| "this CPU has no AVX-512F/BW".into())
            }
            #[allow(unreachable_patterns)]
            _ => Some("not built for this platform".into()),
        }
    }

    /// The paths this process can run, best first.
    pub fn available() -> Vec<Kernel> {
        Kernel::ALL.into_iter().filter(|k| k.unavailable().is_none()).collect()
    }
}

/// The kernel this process runs: what `RERANKD_KERNEL` asks for where the CPU has it, otherwise
/// the best it has (without `amx` under `RERANKD_AMX=off`). Decided and logged at the first call.
pub fn chosen() -> Kernel {
    static CHOSEN: OnceLock<Kernel> = OnceLock::new();
    *CHOSEN.get_or_init(|| {
        let amx_off = matches!(std::env::var("RERANKD_AMX").as_deref(), Ok("off" | "0"));
        let best = Kernel::available().into_iter().find(|k| !(amx_off && *k == Kernel::Amx)).unwrap_or(Kernel::F32);
        let asked = std::env::var("RERANKD_KERNEL").ok().filter(|s| !s.is_empty() && s != "auto");
        let kernel = match asked.as_deref().map(|s| (s, Kernel::parse(s))) {
            None => best,
            Some((_, Some(k))) if k.unavailable().is_none() => k,
            Some((_, Some(k))) => {
                let why = k.unavailable().unwrap_or_default();
                tracing::warn!(asked = k.name(), taken = best.name(), "RERANKD_KERNEL: {why}");
                best
            }
            Some((s, None)) => {
                let names: Vec<_> = Kernel::ALL.iter().map(|k| k.name()).collect();
                tracing::warn!(asked = s, taken = best.name(), "RERANKD_KERNEL takes auto, {}", names.join(", "));
                best
            }
        };
        tracing::info!(kernel = kernel.name(), "CPU kernels for the frozen weights' products");
        kernel
    })
}

/// One line for reports: the chosen path and those this CPU could run.
pub fn describe() -> String {
    let avail: Vec<_> = Kernel::available().iter().map(|k| k.name()).collect();
    format!("{} (this CPU can run: {})", chosen().name(), avail.join(", "))
}

/// Why this process cannot use AMX, if it cannot (asked of the CPU and the kernel once).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
pub fn amx_unusable() -> Option<&'static str> {
    static WHY: OnceLock<Option<String>> = OnceLock::new();
    WHY.get_or_init(|| enable_amx().err()).as_deref()
}

/// CPUID says AMX-BF16, AMX-TILE and AVX-512 (the packing's), and the kernel lets this process
/// use the tile state.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn enable_amx() -> Result<(), String> {
    let l7 = std::arch::x86_64::__cpuid_count(7, 0);
    if l7.edx & (1 << 22) == 0 || l7.edx & (1 << 24) == 0 {
        return Err("this CPU has no AMX-BF16".into());
    }
    if !std::is_x86_feature_detected!("avx512f") || !std::is_x86_feature_detected!("avx512bw") {
        return Err("this CPU has no AVX-512".into());
    }
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these arguments only asks for a permission.
    let r = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) };
    if r != 0 {
        return Err(format!("the kernel refused the AMX tile state: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}
