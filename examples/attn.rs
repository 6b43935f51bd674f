use rerankd::model::attention::{Dims, Tiles, backward, forward};
use std::time::Instant;
fn main() {
    let tq: usize = std::env::args().nth(1).map(|s| s.parse().unwrap()).unwrap_or(64);
    let tk: usize = std::env::args().nth(3).map(|s| s.parse().unwrap()).unwrap_or(tq);
    let tile = Tiles { q: tq, k: tk };
    let t: usize = std::env::args().nth(2).map(|s| s.parse().unwrap()).unwrap_or(2048);
    let (g, rep, hd) = (8, 2, 128);
    let d = Dims { groups: g, rep, t, keys: t, hd, offset: 0 };
    let q: Vec<f32> = (0..g * rep * t * hd).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
    let k: Vec<f32> = (0..g * t * hd).map(|i| ((i * 104729) % 1000) as f32 / 1000.0 - 0.5).collect();
    let v = k.clone();
    let t0 = Instant::now();
    let (o, lse) = forward(&q, &k, &v, &d, 0.088, tile);
    let f = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let _ = backward(&q, &k, &v, &o, &lse, &o, &d, 0.088, tile);
    let b = t1.elapsed().as_secs_f64();
    let fl = 2.0 * 2.0 * (g * rep) as f64 * (t * t) as f64 / 2.0 * hd as f64;
    println!(
        "tile {tq}x{tk} t {t}: fwd {:.3} s ({:.0} GFLOP/s), bwd {:.3} s ({:.0} GFLOP/s); x28 layers: {:.1} s",
        f,
        fl / f / 1e9,
        b,
        2.5 * fl / b / 1e9,
        28.0 * (f + b)
    );
}
