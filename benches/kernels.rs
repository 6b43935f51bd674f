//! `cargo bench --bench kernels [-- ROWS...]`: the products against a frozen weight on every CPU
//! kernel path this machine runs (`model::cpu`): `f32` (`kernels::sgemm` on the f32 weight, gemm's
//! kernels), `avx512` and `avx512-bf16` (`model::pairs`, the weight packed once as bf16 pairs).
//! The paths alternate call by call, five rounds, for each projection shape of a Qwen3-0.6B layer,
//! forward (`x w^T`) and backward (`g w`). Prints JSON lines: medians in ms, GFLOP/s counted as f32
//! work, and each path's largest error against an f64 product over a sample of entries, relative
//! to the sum of the terms' magnitudes. AMX has its own bench (`--bench amx`).

#[cfg(target_arch = "x86_64")]
fn main() {
    use rerankd::model::cpu::Kernel;
    let rows: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let rows = if rows.is_empty() { vec![8, 256, 2048] } else { rows };
    println!(
        "{}",
        serde_json::json!({ "cpu_paths": Kernel::available().iter().map(|k| k.name()).collect::<Vec<_>>(), "threads": rayon::current_num_threads() })
    );
    for m in rows {
        for (name, n, k) in [("q", 2048, 1024), ("gate_up", 6144, 1024), ("down", 1024, 3072), ("o", 1024, 2048)] {
            for backward in [false, true] {
                compare(name, m, n, k, backward);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn main() {
    println!("{{\"why\":\"the bf16-pair paths are x86_64's\"}}");
}

#[cfg(target_arch = "x86_64")]
fn compare(name: &str, m: usize, n: usize, k: usize, backward: bool) {
    use rerankd::model::kernels::{Mat, Threads, sgemm};
    use rerankd::model::mat::PackedWeight;
    use rerankd::model::pairs::{PairKernel, Pairs};
    use std::time::Instant;

    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x9e37_79b9);
    let mut next = move || rng.random_range(-1.0f32..1.0);
    let (cols, inner) = if backward { (k, n) } else { (n, k) };
    let a: Vec<f32> = (0..m * inner).map(|_| next()).collect();
    let w: Vec<f32> = (0..n * k).map(|_| f32::from_bits((next() * 0.05).to_bits() & 0xffff_0000)).collect();
    let mut paths: Vec<(&str, Option<Pairs>)> = vec![("f32", None)];
    for (label, kernel) in [("avx512", PairKernel::Fma), ("avx512-bf16", PairKernel::Dot)] {
        if let Some(p) = Pairs::new(&w, n, k, kernel) {
            p.backward_ready();
            paths.push((label, Some(p)));
        }
    }
    let mut out = vec![0f32; m * cols];
    let run = |p: &Option<Pairs>, out: &mut [f32]| match p {
        None => {
            let rhs = if backward { Mat::rows(&w, k) } else { Mat::rows_t(&w, k) };
            sgemm(m, cols, inner, out, cols, Mat::rows(&a, inner), rhs, 1.0, false, Threads::All)
        }
        Some(p) if backward => p.backward(m, Mat::rows(&a, inner), out, cols, false),
        Some(p) => p.forward(m, Mat::rows(&a, inner), out, cols, false),
    };
    let mut times = vec![Vec::new(); paths.len()];
    let mut errs = vec![0f64; paths.len()];
    for (i, (_, p)) in paths.iter().enumerate() {
        run(p, &mut out);
        for s in 0..64 {
            let (r, j) = ((s * 7919) % m, (s * 104_729) % cols);
            let wv = |i: usize| if backward { w[i * k + j] } else { w[j * k + i] };
            let terms = (0..inner).map(|i| f64::from(a[r * inner + i]) * f64::from(wv(i)));
            let (sum, mag) = terms.fold((0.0, 0.0), |(s, t), x| (s + x, t + x.abs()));
            errs[i] = errs[i].max((f64::from(out[r * cols + j]) - sum).abs() / mag.max(1e-30));
        }
    }
    let reps = (2_000_000_000 / (m * n * k).max(1)).clamp(1, 200);
    for _ in 0..5 {
        for (i, (_, p)) in paths.iter().enumerate() {
            let t0 = Instant::now();
            for _ in 0..reps {
                run(p, &mut out);
            }
            times[i].push(t0.elapsed().as_secs_f64() * 1e3 / reps as f64);
        }
    }
    let flop = 2.0 * (m * n * k) as f64;
    for (i, (label, _)) in paths.iter().enumerate() {
        times[i].sort_by(f64::total_cmp);
        let ms = times[i][2];
        println!(
            "{}",
            serde_json::json!({ "shape": name, "rows": m, "out": cols, "in": inner, "backward": backward, "path": label,
                "ms_median": (ms * 1000.0).round() / 1000.0, "gflops": (flop / ms / 1e6).round(), "max_rel_err": errs[i] })
        );
    }
}
