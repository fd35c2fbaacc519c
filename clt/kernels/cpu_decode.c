/* The CLT's CPU kernels (clt/kernels/cpu.py builds and calls them): the sparse cross-layer decode
 * forward and backward, the grouping of its entries by feature, and the encoder's weight gradient
 * from a sparse dh (at the end). fp32, row-major, every tensor contiguous:
 *
 *   W[s]      [F, L - s, d]   the decoder of source layer s
 *   per source layer s, E_s entries sorted by token: cols[s][e], vals[s][e], and offsets[s][i], the
 *   first entry of token i (token i's entries end where token i + 1's begin, the last at nnz[s])
 *   out, g    [n, L, d]        the reconstruction and its gradient
 *
 *   out[i, t]           = sum_{s <= t} sum_{e in bag(s, i)} vals[s][e] W[s][cols[s][e], t - s]
 *   dvals[s][e]         = sum_{t >= s} < W[s][cols[s][e], t - s], g[i(e), t] >
 *   dW[s][f, t - s]     = sum_{e: cols[s][e] = f} vals[s][e] g[i(e), t]   (the transposed pattern)
 *
 * Loops run target layer t outermost, then a panel of columns, then the sources s <= t: the panel
 * of out[:, t] (or of g[:, t]) stays in the core's L2 across all sources, and each (s, t) slab
 * W[s][:, t - s] is read from memory once, copied into a contiguous panel that every entry then
 * reads from L2. Each call covers a set of target layers: the caller runs one set per thread, so
 * out and dW are written by one thread only (dvals: one partial sum per thread, added by the
 * caller). The order of every sum within a call is fixed.
 *
 * At the end, JumpReLU's kernels (clt/kernels/jumprelu.py): the scan of the pre-activations into
 * entries and per-feature sums, and the encoder weight gradient from those entries. */

#include <stdint.h>
#include <string.h>

/* 16 floats as one vector (GCC/Clang vector extension: a zmm register with AVX-512, two ymm with
 * AVX2), at any alignment: the compiler's own vectorisation of these loops is 2x slower. */
#define V 16
typedef float vec __attribute__((vector_size(V * sizeof(float)), aligned(4)));
#define LD(p) (*(const vec *)(p))

/* o[0:d] += x0 r0 + x1 r1 + x2 r2 + x3 r3: one pass over o for four rows. */
static inline void axpy4(float *restrict o, const float *r0, const float *r1, const float *r2,
                         const float *r3, float x0, float x1, float x2, float x3, int64_t d) {
    int64_t k = 0;
    for (; k + V <= d; k += V) {
        vec a = LD(o + k);
        a += x0 * LD(r0 + k);
        a += x1 * LD(r1 + k);
        a += x2 * LD(r2 + k);
        a += x3 * LD(r3 + k);
        *(vec *)(o + k) = a;
    }
    for (; k < d; k++) o[k] += x0 * r0[k] + x1 * r1[k] + x2 * r2[k] + x3 * r3[k];
}

static inline void axpy1(float *restrict o, const float *r, float x, int64_t d) {
    int64_t k = 0;
    for (; k + V <= d; k += V) *(vec *)(o + k) = LD(o + k) + x * LD(r + k);
    for (; k < d; k++) o[k] += x * r[k];
}

static inline float hsum(vec a) {
    float s = 0.0f;
    for (int j = 0; j < V; j++) s += a[j];
    return s;
}

/* out[j] = <r_j, q> for four rows r_j: q is read once per four dot products. */
static inline void dot4(float *out, const float *r0, const float *r1, const float *r2, const float *r3,
                        const float *q, int64_t d) {
    vec a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    int64_t k = 0;
    for (; k + V <= d; k += V) {
        const vec x = LD(q + k);
        a0 += LD(r0 + k) * x;
        a1 += LD(r1 + k) * x;
        a2 += LD(r2 + k) * x;
        a3 += LD(r3 + k) * x;
    }
    float s0 = hsum(a0), s1 = hsum(a1), s2 = hsum(a2), s3 = hsum(a3);
    for (; k < d; k++) {
        s0 += r0[k] * q[k];
        s1 += r1[k] * q[k];
        s2 += r2[k] * q[k];
        s3 += r3[k] * q[k];
    }
    out[0] += s0, out[1] += s1, out[2] += s2, out[3] += s3;
}

static inline float dot1(const float *r, const float *q, int64_t d) {
    vec a = {0};
    int64_t k = 0;
    for (; k + V <= d; k += V) a += LD(r + k) * LD(q + k);
    float s = hsum(a);
    for (; k < d; k++) s += r[k] * q[k];
    return s;
}

static inline int64_t bag_end(const int64_t *off, int64_t i, int64_t n, int64_t nnz) {
    return i + 1 < n ? off[i + 1] : nnz;
}

/* o += sum over the bag [e, e1) of v[e] rows[idx[e]], rows at base + idx * ld. */
static inline void bag_axpy(float *restrict o, const float *base, int64_t ld, const int64_t *idx,
                            const float *v, int64_t e, int64_t e1, int64_t d) {
    for (; e + 4 <= e1; e += 4)
        axpy4(o, base + idx[e] * ld, base + idx[e + 1] * ld, base + idx[e + 2] * ld,
              base + idx[e + 3] * ld, v[e], v[e + 1], v[e + 2], v[e + 3], d);
    for (; e < e1; e++) axpy1(o, base + idx[e] * ld, v[e], d);
}

/* buf[f, :w] = slab[f * ld + c0 : ... + w] for f < F: a column panel of a slab made contiguous. */
static const float *pack(float *restrict buf, const float *slab, int64_t F, int64_t ld, int64_t c0, int64_t w) {
    for (int64_t f = 0; f < F; f++) memcpy(buf + f * w, slab + f * ld + c0, (size_t)w * sizeof(float));
    return buf;
}

/* Columns per panel: a panel of the slab ([F, w]) and of out[:, t] or g[:, t] ([n, w]) fit in L2
 * together (1.5 MB of the core's 2 MB), so out[:, t] stays there across all sources s <= t. */
int64_t clt_panel_width(int64_t F, int64_t n, int64_t d) {
    int64_t w = (int64_t)(1.5 * 1024 * 1024 / 4) / (F + n);
    w = w / V * V;
    if (w < V) w = V;
    return w < d ? w : d;
}

/* out[:, t] for the targets t in targets[0:nt] (written once each). buf: (F + n) pw floats of
 * scratch (pw = clt_panel_width): the slab panel and the out panel, both contiguous (rows of out[:, t] are L d apart:
 * accumulated in place they cost a TLB miss per token). */
void clt_decode_forward(int64_t L, int64_t n, int64_t d, int64_t F, const float *const *W,
                        const int64_t *const *cols, const float *const *vals,
                        const int64_t *const *offsets, const int64_t *nnz, float *out,
                        const int64_t *targets, int64_t nt, float *buf) {
    const int64_t pw = clt_panel_width(F, n, d);
    float *acc = buf + F * pw;
    for (int64_t j = 0; j < nt; j++) {
        const int64_t t = targets[j];
        for (int64_t c0 = 0; c0 < d; c0 += pw) {
            const int64_t w = d - c0 < pw ? d - c0 : pw;
            memset(acc, 0, (size_t)(n * w) * sizeof(float));
            for (int64_t s = 0; s <= t; s++) {
                const int64_t m = L - s, *off = offsets[s];
                if (nnz[s] == 0) continue;
                const float *panel = pack(buf, W[s] + (t - s) * d, F, m * d, c0, w);
                for (int64_t i = 0; i < n; i++)
                    bag_axpy(acc + i * w, panel, w, cols[s], vals[s], off[i], bag_end(off, i, n, nnz[s]), w);
            }
            for (int64_t i = 0; i < n; i++)
                memcpy(out + (i * L + t) * d + c0, acc + i * w, (size_t)w * sizeof(float));
        }
    }
}

/* dvals[s][e] += the terms of the targets in targets[0:nt] (the caller zeroes dvals and sums the
 * partial results of its threads). buf: (F + n) pw floats of scratch: the slab and g panels. */
void clt_decode_backward_vals(int64_t L, int64_t n, int64_t d, int64_t F, const float *const *W,
                              const int64_t *const *cols, const int64_t *const *offsets,
                              const int64_t *nnz, const float *g, const int64_t *targets, int64_t nt,
                              float *const *dvals, float *buf) {
    const int64_t pw = clt_panel_width(F, n, d);
    for (int64_t j = 0; j < nt; j++) {
        const int64_t t = targets[j];
        for (int64_t c0 = 0; c0 < d; c0 += pw) {
            const int64_t w = d - c0 < pw ? d - c0 : pw;
            const float *gp = pack(buf + F * pw, g + t * d, n, L * d, c0, w);
            for (int64_t s = 0; s <= t; s++) {
                const int64_t m = L - s, *off = offsets[s], *c = cols[s];
                float *dv = dvals[s];
                if (nnz[s] == 0) continue;
                const float *p = pack(buf, W[s] + (t - s) * d, F, m * d, c0, w);
                for (int64_t i = 0; i < n; i++) {
                    const float *gi = gp + i * w;
                    int64_t e = off[i];
                    const int64_t e1 = bag_end(off, i, n, nnz[s]);
                    for (; e + 4 <= e1; e += 4)
                        dot4(dv + e, p + c[e] * w, p + c[e + 1] * w, p + c[e + 2] * w, p + c[e + 3] * w,
                             gi, w);
                    for (; e < e1; e++) dv[e] += dot1(p + c[e] * w, gi, w);
                }
            }
        }
    }
}

/* dW[s][:, t - s] for the targets t in targets[0:nt] (overwritten; zero where a feature never
 * fired): A_s^T g[:, t], over the transposed pattern (rows[s][e], the token, and vals[s][e],
 * grouped by feature; foffsets[s][f] where feature f's begin). g[:, t] is packed into buf (n d
 * floats) and stays in L2 across s. */
void clt_decode_backward_W(int64_t L, int64_t n, int64_t d, int64_t F, const int64_t *const *rows,
                           const float *const *vals, const int64_t *const *foffsets, const int64_t *nnz,
                           const float *g, float *const *dW, const int64_t *targets, int64_t nt,
                           float *buf) {
    for (int64_t j = 0; j < nt; j++) {
        const int64_t t = targets[j];
        const float *gt = pack(buf, g + t * d, n, L * d, 0, d);
        for (int64_t s = 0; s <= t; s++) {
            const int64_t m = L - s, *off = foffsets[s];
            for (int64_t f = 0; f < F; f++) {
                float *o = dW[s] + (f * m + (t - s)) * d;
                memset(o, 0, (size_t)d * sizeof(float));
                bag_axpy(o, gt, d, rows[s], vals[s], off[f], bag_end(off, f, F, nnz[s]), d);
            }
        }
    }
}

/* The transposed pattern of every source layer: its entries grouped by feature by a stable
 * counting sort (O(E + F), where torch's argsort is O(E log E)): t_rows[s], t_vals[s] in feature
 * order, foffsets[s][f] where feature f's begin. cursor: F int64 of scratch. */
void clt_group_by_feature(int64_t L, int64_t F, const int64_t *const *rows, const int64_t *const *cols,
                          const float *const *vals, const int64_t *nnz, int64_t *const *t_rows,
                          float *const *t_vals, int64_t *const *foffsets, int64_t *cursor) {
    for (int64_t s = 0; s < L; s++) {
        int64_t *off = foffsets[s];
        const int64_t *c = cols[s], *r = rows[s];
        const float *v = vals[s];
        memset(cursor, 0, (size_t)F * sizeof(int64_t));
        for (int64_t e = 0; e < nnz[s]; e++) cursor[c[e]]++;
        int64_t start = 0;
        for (int64_t f = 0; f < F; f++) {
            const int64_t count = cursor[f];
            off[f] = cursor[f] = start;
            start += count;
        }
        for (int64_t e = 0; e < nnz[s]; e++) {
            const int64_t at = cursor[c[e]]++;
            t_rows[s][at] = r[e];
            t_vals[s][at] = v[e];
        }
    }
}

/* The encoder's weight gradient from a sparse dh (TopK, BatchTopK: the selected pairs; JumpReLU:
 * active and band): dW_enc[l, f] = sum_n dh[n, l, f] x[n, l] over the non-zero dh only, for the
 * layers in layers[0:nl] (overwritten). dh: [n, L, F], x: [n, L, d], dW: [L, F, d]. One scan of
 * dh; dW[l] ([F, d]) stays in L2 while the tokens go by. */
void clt_encoder_weight_grad(int64_t n, int64_t L, int64_t F, int64_t d, const float *dh, const float *x,
                             float *dW, const int64_t *layers, int64_t nl) {
    for (int64_t j = 0; j < nl; j++) {
        const int64_t l = layers[j];
        float *dWl = dW + l * F * d;
        memset(dWl, 0, (size_t)(F * d) * sizeof(float));
        for (int64_t i = 0; i < n; i++) {
            const float *g = dh + (i * L + l) * F, *xr = x + (i * L + l) * d;
            for (int64_t f = 0; f < F; f++)
                if (g[f] != 0.0f) axpy1(dWl + f * d, xr, g[f], d);
        }
    }
}

/* JumpReLU's scan of the pre-activations (clt/kernels/jumprelu.py): for each layer l in
 * layers[0:nl], over h: [L, n, F] (layer-major, as the encoder's batched GEMM writes it) with
 * theta, lo = theta - bandwidth / 2: [L, F],
 *   counts[l]  = #{(i, f): h[i, l, f] > lo[l, f]}        (the entries: active, band, h = theta)
 *   R[l, f]    = sum_i max(theta[l, f] - h[i, l, f], 0)   (the pre-activation loss, per feature)
 *   C[l, f]    = #{i: h[i, l, f] < theta[l, f]}            (its theta gradient's support)
 * R and C are summed in double per feature and written as float; acc: F doubles of scratch. */
void clt_jumprelu_count(int64_t n, int64_t L, int64_t F, const float *h, const float *theta,
                        const float *lo, int64_t *counts, float *R, float *C, const int64_t *layers,
                        int64_t nl, double *acc) {
    for (int64_t j = 0; j < nl; j++) {
        const int64_t l = layers[j];
        const float *th = theta + l * F, *lw = lo + l * F;
        float *Cl = C + l * F;
        memset(acc, 0, (size_t)F * sizeof(double));
        memset(Cl, 0, (size_t)F * sizeof(float));
        int64_t count = 0;
        for (int64_t i = 0; i < n; i++) {
            const float *row = h + (l * n + i) * F;
            for (int64_t f = 0; f < F; f++) {
                const float v = row[f], below = th[f] - v;
                count += v > lw[f];
                if (below > 0.0f) {
                    acc[f] += below;
                    Cl[f] += 1.0f;
                }
            }
        }
        counts[l] = count;
        for (int64_t f = 0; f < F; f++) R[l * F + f] = (float)acc[f];
    }
}

/* The entries themselves, layer by layer from starts[l] (the running sum of counts), each layer's
 * in (token, feature) order: rows[e] = i, cols[e] = f, hv[e] = h[i, l, f] for h[i, l, f] > lo[l, f]. */
void clt_jumprelu_entries(int64_t n, int64_t L, int64_t F, const float *h, const float *lo,
                          const int64_t *starts, int64_t *rows, int64_t *cols, float *hv,
                          const int64_t *layers, int64_t nl) {
    for (int64_t j = 0; j < nl; j++) {
        const int64_t l = layers[j];
        const float *lw = lo + l * F;
        int64_t e = starts[l];
        for (int64_t i = 0; i < n; i++) {
            const float *row = h + (l * n + i) * F;
            for (int64_t f = 0; f < F; f++)
                if (row[f] > lw[f]) {
                    rows[e] = i;
                    cols[e] = f;
                    hv[e++] = row[f];
                }
        }
    }
}

/* The encoder's weight gradient from entries plus a per-feature constant (JumpReLU's dh: sparse
 * on its entries, and -lambda_P ||W_dec|| / n at every token below theta, written as that constant
 * everywhere plus its correction on the entries):
 *   dW[l, f] = D[l, f] xsum[l] + sum_{e of layer l, cols[e] = f} g[e] x[rows[e], l]
 * with xsum[l] = sum_i x[i, l]. x: [n, L, d], D: [L, F], xsum: [L, d], dW: [L, F, d]; layer l's
 * entries are e in [starts[l], starts[l] + counts[l]). */
void clt_encoder_weight_grad_entries(int64_t L, int64_t F, int64_t d, const float *x,
                                     const int64_t *starts, const int64_t *counts,
                                     const int64_t *rows, const int64_t *cols, const float *g,
                                     const float *D, const float *xsum, float *dW,
                                     const int64_t *layers, int64_t nl) {
    for (int64_t j = 0; j < nl; j++) {
        const int64_t l = layers[j];
        float *dWl = dW + l * F * d;
        const float *xs = xsum + l * d;
        for (int64_t f = 0; f < F; f++) {
            float *o = dWl + f * d;
            const float c = D[l * F + f];
            for (int64_t k = 0; k < d; k++) o[k] = c * xs[k];
        }
        const int64_t end = starts[l] + counts[l];
        for (int64_t e = starts[l]; e < end; e++)
            if (g[e] != 0.0f) axpy1(dWl + cols[e] * d, x + (rows[e] * L + l) * d, g[e], d);
    }
}
