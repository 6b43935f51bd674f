//! `cargo bench --bench attention [-- LENGTH...]`: the tiled causal attention of one Qwen3-0.6B
//! layer (16 query heads over 8 KV heads, head_dim 128), forward and backward, at several tile
//! shapes and lengths; medians of 3 runs, GFLOP/s counted over the causal half only, and the
//! seconds 28 layers would take. It is how `model::attention::TILES` was chosen.

use std::time::Instant;

use rerankd::model::attention::{Dims, TILES, Tiles, backward, forward};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let lengths: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let lengths = if lengths.is_empty() { vec![256, 1024, 2048] } else { lengths };
    let (g, rep, hd) = (8, 2, 128);
    for t in lengths {
        let d = Dims { groups: g, rep, t, keys: t, hd, offset: 0 };
        let q: Vec<f32> = (0..g * rep * t * hd).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
        let k: Vec<f32> = (0..g * t * hd).map(|i| ((i * 104_729) % 1000) as f32 / 1000.0 - 0.5).collect();
        let v: Vec<f32> = (0..g * t * hd).map(|i| ((i * 15_485_863) % 1000) as f32 / 1000.0 - 0.5).collect();
        let flops = 2.0 * 2.0 * (g * rep) as f64 * (t * t) as f64 / 2.0 * hd as f64;
        for tiles in [Tiles { q: 64, k: 64 }, Tiles { q: 128, k: 128 }, TILES, Tiles { q: 256, k: 512 }] {
            let (mut fwd, mut bwd) = (Vec::new(), Vec::new());
            for _ in 0..3 {
                let t0 = Instant::now();
                let (o, lse) = forward(&q, &k, &v, &d, 0.088, tiles);
                fwd.push(t0.elapsed().as_secs_f64());
                let t1 = Instant::now();
                let _ = backward(&q, &k, &v, &o, &lse, &o, &d, 0.088, tiles);
                bwd.push(t1.elapsed().as_secs_f64());
            }
            let (f, b) = (median(fwd), median(bwd));
            println!(
                "{{\"length\":{t},\"tiles\":\"{}x{}\",\"fwd_ms\":{:.1},\"bwd_ms\":{:.1},\"fwd_gflops\":{:.0},\"bwd_gflops\":{:.0},\"s_for_28_layers\":{:.2}}}",
                tiles.q,
                tiles.k,
                f * 1e3,
                b * 1e3,
                flops / f / 1e9,
                2.5 * flops / b / 1e9,
                28.0 * (f + b)
            );
        }
    }
}
