/* The forward of the chunked Mamba-2 scan (SSD) on a CPU, one chunk and head at a time in cache.

   fedem.model.native compiles this file at first use with the machine's C compiler, with the sizes
   P (head_dim), N (state) and Q (chunk) as compile-time constants, so that every contraction below is
   an inner loop over P contiguous floats that the compiler keeps in vector registers, R rows at once.
   The algebra is fedem.model.ssd's (its docstring has the glossary); per chunk and head, with
   a_t = dt_t * A and s_l = a_1 + ... + a_l:

       y_l   = sum_{u <= l} exp(s_l - s_u) (C_l . B_u) dt_u x_u  +  exp(s_l) C_l . H_in
       H_out = exp(s_Q) H_in  +  sum_u exp(s_Q - s_u) dt_u x_u (x) B_u

   The decays are products of the per-step factors exp(a_t) <= 1, never exponentials of differences:
   row l of the (Q x Q) decay is row l - 1 times exp(a_l), so there are Q calls to exp per chunk and
   head, and nothing can overflow.

   Layouts (row-major, contiguous): x, y (rows, L, H, P); dt (rows, L, H); A (H); B, C (rows, L, G, N);
   initial, final (rows, H, P, N) or initial NULL; states_in (rows, L / Q, H, P, N), the state entering
   each chunk, which the backward in fedem.model.ssd reads, or NULL where no backward follows (writing
   them costs ~20% at batch 8). L is a multiple of Q. */

#include <math.h>
#include <stdlib.h>
#include <string.h>
#ifdef __SSE__
#include <xmmintrin.h>
#endif

#define R 4 /* rows of a contraction held in registers at once; P, N and Q are multiples of it */

/* acc[r][p] += sum_k a[r * lda + k] * b[k * P + p] for r < R, k < K. */
static inline void rows_times(int K, const float *a, int lda, const float *b, float acc[R][P]) {
    for (int k = 0; k < K; k++) {
        const float *bk = b + k * P;
        const float a0 = a[k], a1 = a[lda + k], a2 = a[2 * lda + k], a3 = a[3 * lda + k];
        for (int p = 0; p < P; p++) {
            const float v = bk[p];
            acc[0][p] += a0 * v;
            acc[1][p] += a1 * v;
            acc[2][p] += a2 * v;
            acc[3][p] += a3 * v;
        }
    }
}

/* One row (sequence) of the batch, heads [h0, h1); `state` holds (h1 - h0) states of (N, P) floats. */
static void scan_row(long L, int H, int G, const float *x, const float *dt, const float *A,
                     const float *B, const float *C, const float *initial, float *y, float *states_in,
                     float *final, int h0, int h1, float *state) {
    float scores[Q * Q], mixing[Q * Q], decay[Q * Q], xbar[Q * P], Bt[N * Q], factor[Q];
    const int per_group = H / G;
    const long stride = (long)G * N; /* from one position's B (or C) to the next */
    /* The states, kept as (N, P) so that their contractions run along P. */
    for (int h = h0; h < h1; h++)
        for (int n = 0; n < N; n++)
            for (int p = 0; p < P; p++)
                state[((h - h0) * N + n) * P + p] = initial ? initial[((long)h * P + p) * N + n] : 0.f;
    for (long c0 = 0; c0 < L; c0 += Q) {
        int scored = -1; /* the group whose scores are in `scores` */
        for (int h = h0; h < h1; h++) {
            const int g = h / per_group;
            float *st = state + (long)(h - h0) * N * P;
            if (states_in) {
                float *entering = states_in + ((c0 / Q) * H + h) * (long)P * N;
                for (int n = 0; n < N; n++)
                    for (int p = 0; p < P; p++) entering[p * N + n] = st[n * P + p];
            }
            const float *Bc = B + (c0 * G + g) * N, *Cc = C + (c0 * G + g) * N;
            if (g != scored) {
                /* scores[l][u] = C_l . B_u, shared by the group's heads; through B transposed, so
                   that the loop runs along u. */
                for (int u = 0; u < Q; u++)
                    for (int n = 0; n < N; n++) Bt[n * Q + u] = Bc[u * stride + n];
                for (int l = 0; l < Q; l += R) {
                    float acc[R][Q];
                    memset(acc, 0, sizeof acc);
                    for (int n = 0; n < N; n++) {
                        const float *bn = Bt + n * Q;
                        const float c0v = Cc[l * stride + n], c1v = Cc[(l + 1) * stride + n];
                        const float c2v = Cc[(l + 2) * stride + n], c3v = Cc[(l + 3) * stride + n];
                        for (int u = 0; u < Q; u++) {
                            acc[0][u] += c0v * bn[u];
                            acc[1][u] += c1v * bn[u];
                            acc[2][u] += c2v * bn[u];
                            acc[3][u] += c3v * bn[u];
                        }
                    }
                    for (int r = 0; r < R; r++) memcpy(scores + (l + r) * Q, acc[r], sizeof acc[r]);
                }
                scored = g;
            }
            /* factor_l = exp(a_l); decay[l][u] = exp(s_l - s_u) for u <= l, 0 above; x̄ = dt x. */
            for (int l = 0; l < Q; l++) {
                const float d = dt[(c0 + l) * H + h];
                factor[l] = expf(d * A[h]);
                const float *xl = x + ((c0 + l) * H + h) * P;
                for (int p = 0; p < P; p++) xbar[l * P + p] = d * xl[p];
            }
            for (int u = 0; u < Q; u++) decay[u] = u == 0 ? 1.f : 0.f;
            for (int l = 1; l < Q; l++) {
                const float f = factor[l];
                for (int u = 0; u < Q; u++) decay[l * Q + u] = u == l ? 1.f : decay[(l - 1) * Q + u] * f;
            }
            for (int i = 0; i < Q * Q; i++) mixing[i] = scores[i] * decay[i];
            /* y = mixing x̄ + exp(s_l) C_l . H_in, R positions at a time; exp(s_l) = decay[l][0] · factor_0. */
            for (int l = 0; l < Q; l += R) {
                float diagonal[R][P], off[R][P];
                memset(diagonal, 0, sizeof diagonal);
                memset(off, 0, sizeof off);
                rows_times(l + R, mixing + l * Q, Q, xbar, diagonal);
                rows_times(N, Cc + l * stride, (int)stride, st, off);
                for (int r = 0; r < R; r++) {
                    const float into = decay[(l + r) * Q] * factor[0];
                    float *yl = y + ((c0 + l + r) * H + h) * P;
                    for (int p = 0; p < P; p++) yl[p] = diagonal[r][p] + into * off[r][p];
                }
            }
            /* H_out = exp(s_Q) H_in + sum_u exp(s_Q - s_u) x̄_u (x) B_u; exp(s_Q - s_u) = decay[Q-1][u]. */
            const float through = decay[(Q - 1) * Q] * factor[0];
            for (int u = 0; u < Q; u++) {
                const float w = decay[(Q - 1) * Q + u];
                for (int p = 0; p < P; p++) xbar[u * P + p] *= w;
            }
            for (int n = 0; n < N; n += R) {
                float acc[R][P];
                for (int r = 0; r < R; r++)
                    for (int p = 0; p < P; p++) acc[r][p] = through * st[(n + r) * P + p];
                rows_times(Q, Bt + n * Q, Q, xbar, acc);
                for (int r = 0; r < R; r++) memcpy(st + (n + r) * P, acc[r], sizeof acc[r]);
            }
        }
    }
    for (int h = h0; h < h1; h++)
        for (int n = 0; n < N; n++)
            for (int p = 0; p < P; p++)
                final[((long)h * P + p) * N + n] = state[((h - h0) * N + n) * P + p];
}

/* Rows [r0, r1) of the batch, heads [h0, h1) of each; see the layouts above. 0, or 1 if out of memory. */
int ssd_forward(long L, int H, int G, const float *x, const float *dt, const float *A, const float *B,
                 const float *C, const float *initial, float *y, float *states_in, float *final, int r0,
                 int r1, int h0, int h1) {
    const long chunks = L / Q;
    float *state = malloc(sizeof(float) * (size_t)(h1 - h0) * N * P);
    if (!state) return 1;
#ifdef __SSE__
    /* Decays of long chunks reach subnormal floats, which cost x86 ~100 cycles an operation (2.5×
       the whole loop here); flush them to zero while it runs (they weigh < 1e-38), then restore. */
    const unsigned int caller_mode = _mm_getcsr();
    _mm_setcsr(caller_mode | 0x8040); /* flush-to-zero and denormals-are-zero */
#endif
    for (int r = r0; r < r1; r++)
        scan_row(L, H, G, x + r * L * H * P, dt + r * L * H, A, B + r * L * G * N, C + r * L * G * N,
                 initial ? initial + (long)r * H * P * N : NULL, y + r * L * H * P,
                 states_in ? states_in + r * chunks * H * P * N : NULL, final + (long)r * H * P * N, h0, h1, state);
#ifdef __SSE__
    _mm_setcsr(caller_mode);
#endif
    free(state);
    return 0;
}
