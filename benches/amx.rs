//! `cargo bench --bench amx [-- ROWS...]`: rerankd's AMX path (`model::amx`, the bf16x3 products
//! `RERANKD_AMX=on` turns on) measured beside the f32 matmul it replaces.
//!
//! Prints, as JSON lines:
//! - the `tdpbf16ps` rate of one core with the operands in tile registers (the unit's ceiling),
//!   and with the kernel's pattern of tile loads from buffers in L1 (the kernel's ceiling), five
//!   samples each: on a machine whose tile unit runs at more than one speed, they show it;
//! - for each projection shape of a Qwen3-0.6B layer (`x [rows, in] @ w[out, in]^T`, the weight as
//!   the checkpoint lays it out), seven rounds alternating `kernels::sgemm` with AMX off (f32, what
//!   rerankd runs by default) and on (both operands split and packed per call, as in use): medians,
//!   GFLOP/s counted as f32 work, and each one's largest error against an f64 product over a
//!   sample of entries.
//!
//! Needs x86_64 Linux with AMX and a kernel that grants the tile state; anywhere else it says why
//! and stops.

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn main() {
    use rerankd::model::amx;
    let rows: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let rows = if rows.is_empty() { vec![256, 1024, 2048] } else { rows };
    if let Some(why) = amx::unusable() {
        println!("{}", serde_json::json!({ "amx": false, "why": why }));
        return;
    }
    let (registers, with_loads): (Vec<f64>, Vec<f64>) = (0..5).filter_map(|_| amx::tile_rates()).unzip();
    let round = |v: Vec<f64>| v.into_iter().map(f64::round).collect::<Vec<_>>();
    println!(
        "{}",
        serde_json::json!({ "amx": true, "one_core_bf16_gflops": {
            "tiles_in_registers": round(registers), "kernel_loads_from_l1": round(with_loads) } })
    );
    // q (k and v are half of it), gate|up, down, o.
    for m in rows {
        for (name, n, k) in [("q", 2048, 1024), ("gate_up", 6144, 1024), ("down", 1024, 3072), ("o", 1024, 2048)] {
            compare(name, m, n, k);
        }
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn main() {
    println!("{{\"amx\":false,\"why\":\"rerankd's AMX path is for x86_64 Linux\"}}");
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn compare(name: &str, m: usize, n: usize, k: usize) {
    use rerankd::model::amx::{Mode, Packed, set_mode};
    use rerankd::model::kernels::{Mat, Threads, sgemm};
    use rerankd::model::mat::PackedWeight;
    use std::time::Instant;

    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x9e37_79b9);
    let mut next = move || rng.random_range(-1.0f32..1.0);
    let x: Vec<f32> = (0..m * k).map(|_| next()).collect();
    let g: Vec<f32> = (0..m * n).map(|_| next()).collect();
    // The weight's values are bf16s, as a bf16 checkpoint's are once widened (what Packed takes).
    let w: Vec<f32> = (0..n * k).map(|_| f32::from_bits((next() * 0.05).to_bits() & 0xffff_0000)).collect();
    set_mode(Mode::All);
    let packed = Packed::new(&w, n, k).expect("bf16 values");
    let mut outs = [vec![0f32; m * n], vec![0f32; m * n], vec![0f32; m * n]];
    let mut back = [vec![0f32; m * k], vec![0f32; m * k]];
    let mut times: [Vec<f64>; 5] = Default::default();
    let timed = |f: &mut dyn FnMut()| {
        let t = Instant::now();
        f();
        t.elapsed().as_secs_f64()
    };
    for _ in 0..7 {
        // `All`: through AMX at every row count (by default only from 1024 rows).
        for (i, mode) in [Mode::Off, Mode::All].into_iter().enumerate() {
            set_mode(mode);
            let out = &mut outs[i];
            times[i].push(timed(&mut || {
                sgemm(m, n, k, out, n, Mat::rows(&x, k), Mat::rows_t(&w, k), 1.0, false, Threads::All)
            }));
        }
        times[2].push(timed(&mut || packed.forward(m, Mat::rows(&x, k), &mut outs[2], n, false)));
        set_mode(Mode::Off);
        let out = &mut back[0];
        times[3]
            .push(timed(&mut || sgemm(m, k, n, out, k, Mat::rows(&g, n), Mat::rows(&w, k), 1.0, false, Threads::All)));
        times[4].push(timed(&mut || packed.backward(m, Mat::rows(&g, n), &mut back[1], k, false)));
    }
    set_mode(Mode::Off);
    let [f, a, p, fb, pb] = times.map(|mut v| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    });
    // Largest |c - lhs rhs| against f64 over a sample of entries, `c` of `cols` columns, the
    // sum over `inner`: the forward's x w^T and the backward's g w.
    let worst =
        |c: &[f32], cols: usize, inner: usize, lhs: &dyn Fn(usize, usize) -> f32, rhs: &dyn Fn(usize, usize) -> f32| {
            let mut worst = 0f64;
            for i in (0..m).step_by(7) {
                for j in (0..cols).step_by(13) {
                    let exact: f64 = (0..inner).map(|kk| f64::from(lhs(i, kk)) * f64::from(rhs(kk, j))).sum();
                    worst = worst.max((f64::from(c[i * cols + j]) - exact).abs());
                }
            }
            worst
        };
    let error = |c: &[f32]| worst(c, n, k, &|i, kk| x[i * k + kk], &|kk, j| w[j * k + kk]);
    let error_back = |c: &[f32]| worst(c, k, n, &|i, nn| g[i * n + nn], &|nn, j| w[nn * k + j]);
    let flop = 2.0 * (m * n * k) as f64;
    let ms = |t: f64| (t * 1e5).round() / 100.0;
    let gf = |t: f64| (flop / t / 1e9).round();
    println!(
        "{}",
        serde_json::json!({
            "proj": name, "m": m, "n": n, "k": k,
            "f32_ms": ms(f), "amx_ms": ms(a), "packed_ms": ms(p),
            "f32_gflops": gf(f), "amx_gflops": gf(a), "packed_gflops": gf(p),
            "speedup": (f / a * 100.0).round() / 100.0, "packed_speedup": (f / p * 100.0).round() / 100.0,
            "backward_f32_ms": ms(fb), "backward_packed_ms": ms(pb), "backward_packed_speedup": (fb / pb * 100.0).round() / 100.0,
            "f32_max_err": format!("{:.2e}", error(&outs[0])), "amx_max_err": format!("{:.2e}", error(&outs[1])),
            "packed_max_err": format!("{:.2e}", error(&outs[2])),
            "backward_f32_max_err": format!("{:.2e}", error_back(&back[0])),
            "backward_packed_max_err": format!("{:.2e}", error_back(&back[1])),
        })
    );
}
