"""ThriftPrefillWSKernel: the warp-specialized SM90 variant of the fused prefill (schedule.warp_spec, sm_90a wgmma).

Same numerics and the same per-tile math as ThriftPrefillKernel (kernels/prefill.py, whose step / epilogue it runs);
what changes is who does what. One CTA = 1 + n warpgroups (n = schedule.consumers, 2 or 3: 384 or 512 threads, one
CTA per SM), grid (ceil(nqb / n), Hq, B). Everything the consumers read arrives through one ring of 16-bit K / V
stages (schedule.ws_ring), filled by the producer in this order:

  warpgroup 0, the producer (setmaxnreg down to schedule.producer_regs):
    phase 1: walks the union of the n consumers' phase-1 tile lists (key tiles causally visible to a block and
      not selected by it; descending), loads each FP4 K/V tile with cp.async into its own `stages`-deep FP4 ring
      (producer-only named barrier), waits for ring stage r to be empty, decodes the tile ONCE into stage r
      (kring[r] = dq(K), vring[r] = dq(V)^T; the SM90 "bits" fp16 decode), fences the writes into the async proxy
      (the consumers' wgmmas read them), and publishes the stage: thread 0 writes its meta entry (tile index,
      which consumers use it) and every producer thread arrives on full[r].
    phase 2: each consumer's selected key tiles, round-robin over the consumers: waits for stage r to be empty,
      cp.asyncs the 16-bit K and V tiles into it and arrives on full[r] with cp.async.mbarrier.arrive.noinc (the
      arrival fires when the thread's copies land, so the producer never waits for its loads: the look-ahead is
      the ring's depth); the last, partial key tile
      (rows past Skv zero-filled by plain stores) is waited for and released by a normal arrive instead.
    Then an end-of-stream entry (tile -1).
  warpgroups 1 .. n, the consumers (setmaxnreg up to schedule.consumer_regs): consumer c owns query block
      n * pair + c. Each decodes its FP4 Q into sQ[c], then per ring stage: wait full[r]; if the tile is its own,
      the step of kernels/prefill.py -- phase 1: S = dq(Q) dq(K)^T wgmma on kring[r], online softmax, two-level P
      quantization, O += P' dq(V) wgmma on vring[r]; phase 2: S = Q K^T, P in 16 bit, O += P V (the same m / l /
      O registers); before its first phase-2 tile it converts O to true units and loads the real 16-bit Q over
      the decoded one. Then it arrives on empty[r] (every consumer thread, whether it used the tile or not). At
      the end-of-stream entry: the epilogue, with its own 128-thread named barrier.

The decode of a key tile is shared by the n query blocks (1/n of the decode work per block of the one-warpgroup
kernel), the consumers' loop has no CTA barrier (a consumer waits only for the stage it reads next), and phase 2's
loads run ahead of its math like phase 1's.
Barriers: mbarriers full[r] (128 producer arrivals + 1 by thread 0 after the meta entry) / empty[r] (128 n
consumer arrivals), r < ring; named barriers 1 (producer warpgroup), 3 + c (consumer c). Byte map:
layouts.prefill.PrefillWSSmemMap.
"""
from __future__ import annotations

from types import SimpleNamespace

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, Int64, Uint32, const_expr

from kernels.prefill import ThriftPrefillKernel
from kernels.schedules import PrefillSchedule
from layouts.prefill import PrefillWSSmemMap, wgmma_tile_layout_16b

WG = 128          # threads per warpgroup
BAR_PRODUCER, BAR_CONSUMER0 = 1, 3  # named barrier ids (0 is the CTA's; 3 + c: consumer c)
# meta users word: bits 0 .. n-1 = the consumers that use the stage; these flags say what the stage holds
META_P2 = 1 << 4          # a 16-bit K/V tile (phase 2), else a decoded FP4 tile (phase 1)


class ThriftPrefillWSKernel(ThriftPrefillKernel):
    """Static configuration of one compiled warp-specialized prefill kernel (see module docstring)."""

    ws = True

    def __init__(self, dtype, head_dim: int, causal: bool, schedule: PrefillSchedule, arch: int,
                 fmt: str = "nvfp4", has_lse: bool = True):
        super().__init__(dtype, head_dim, causal, schedule, arch, fmt=fmt, has_lse=has_lse)
        if not (schedule.uses_ws(arch) and self.wg and self.path.needs_decode and self.bits):
            raise ValueError(f"ThriftPrefillWSKernel: schedule {schedule} on sm_{arch} is not the warp-specialized "
                             f"sm_90a wgmma FP4-decode path (schedule.uses_ws)")
        self.nc = schedule.consumers          # consumer warpgroups = query blocks per CTA
        self.ring = schedule.ws_ring          # 16-bit ring stages
        self.smap = PrefillWSSmemMap(head_dim, self.Tm, self.Tn, self.S, self.ring, self.nc)
        self.regs_producer = schedule.producer_regs
        self.regs_consumer = schedule.consumer_regs

    # ------------------------------------------------------------------------------------------
    # host side
    # ------------------------------------------------------------------------------------------
    @cute.jit
    def __call__(self, mQ: cute.Tensor, mK: cute.Tensor, mV: cute.Tensor,
                 mQp: cute.Tensor, mQs: cute.Tensor, mKp: cute.Tensor, mKs: cute.Tensor,
                 mVp: cute.Tensor, mVs: cute.Tensor, mMask: cute.Tensor, mSel: cute.Tensor,
                 mO: cute.Tensor, mLSE: cute.Tensor, mKd: cute.Tensor, mVd: cute.Tensor,
                 softmax_scale_log2: Float32, qhead_per_kv: Int32, stream):
        """The arguments of ThriftPrefillKernel.__call__ (mKd / mVd unused)."""
        D, Tm, Tn, nc, ring = self.D, self.Tm, self.Tn, self.nc, self.ring
        dt = self.dtype
        sQ_layout = wgmma_tile_layout_16b(dt, Tm, D, nc)         # sQ[c]
        sK_layout = wgmma_tile_layout_16b(dt, Tn, D, ring)       # kring[r]; phase 2: consumer c's K tile
        sVt_layout = wgmma_tile_layout_16b(dt, D, Tn, ring)      # vring[r] (decoded V^T, keys contiguous)
        sV_layout = wgmma_tile_layout_16b(dt, Tn, D, ring)       # phase 2: consumer c's V tile (over vring[c])
        h = self.copies_and_mmas()
        nqb = cute.ceil_div(mQ.shape[1], Tm)
        grid = (cute.ceil_div(nqb, nc), cute.size(mQ.shape[2]), cute.size(mQ.shape[0]))
        self.kernel(mQ, mQp, mQs, mKp, mKs, mVp, mVs, mK, mV, mMask, mSel, mO, mLSE,
                    softmax_scale_log2, qhead_per_kv, sQ_layout, sK_layout, sVt_layout, sV_layout,
                    h.copy_kv16, h.copy_kp, h.copy_ks, h.copy_vp, h.copy_vs, h.copy_rows16, h.copy_dec16,
                    h.copy_vt16, h.mma_qk, h.mma_qk1, h.mma_pvk, h.mma_pvmn).launch(
                        grid=grid, block=[WG * (1 + nc), 1, 1], smem=self.smap.total_bytes, stream=stream,
                        min_blocks_per_mp=1)  # .minnctapersm 1: ptxas caps at entry_regs (168 / 128) per thread

    # ------------------------------------------------------------------------------------------
    # device side
    # ------------------------------------------------------------------------------------------
    @cute.kernel
    def kernel(self, mQ: cute.Tensor, mQp: cute.Tensor, mQs: cute.Tensor, mKp: cute.Tensor, mKs: cute.Tensor,
               mVp: cute.Tensor, mVs: cute.Tensor, mK: cute.Tensor, mV: cute.Tensor, mMask: cute.Tensor,
               mSel: cute.Tensor, mO: cute.Tensor, mLSE: cute.Tensor,
               softmax_scale_log2: Float32, qhead_per_kv: Int32,
               sQ_layout: cute.ComposedLayout, sK_layout: cute.ComposedLayout, sVt_layout: cute.ComposedLayout,
               sV_layout: cute.ComposedLayout,
               copy_kv16: cute.TiledCopy, copy_kp: cute.TiledCopy, copy_ks: cute.TiledCopy,
               copy_vp: cute.TiledCopy, copy_vs: cute.TiledCopy, copy_rows16: cute.TiledCopy,
               copy_dec16: cute.TiledCopy, copy_vt16: cute.TiledCopy, mma_qk: cute.TiledMma,
               mma_qk1: cute.TiledMma, mma_pvk: cute.TiledMma, mma_pvmn: cute.TiledMma):
        Tm, nc, ring = self.Tm, self.nc, self.ring
        sm = self.smap
        tidx, _, _ = cute.arch.thread_idx()
        wg = cute.arch.make_warp_uniform(cute.arch.warp_idx()) // 4
        bx, hq, b = cute.arch.block_idx()
        Sq = mQ.shape[1]
        Skv = mK.shape[1]
        nqb = cute.ceil_div(Sq, Tm)
        npair = cute.ceil_div(nqb, nc)
        pair = bx
        if const_expr(self.causal):
            pair = npair - 1 - bx  # heaviest (longest causal rows) first
        hkv = hq // qhead_per_kv

        smem = cutlass.utils.SmemAllocator()
        base = smem.allocate(sm.total_bytes, 1024)
        mbar = cute.recast_ptr(base + sm.mbar_off, dtype=Int64)  # full[r] = mbar + r, empty[r] = mbar + ring + r
        meta = cute.make_tensor(cute.recast_ptr(base + sm.meta_off, dtype=Int32), cute.make_layout((2 * ring,)))
        if tidx == 0:
            for r in cutlass.range_constexpr(ring):
                cute.arch.mbarrier_init(mbar + r, WG + 1)  # the producer's threads + thread 0 once more (meta)
                cute.arch.mbarrier_init(mbar + ring + r, WG * nc)
            cute.arch.mbarrier_init_fence()
        cute.arch.barrier()  # the mbarriers are initialized for every thread

        g = SimpleNamespace(mQ=mQ, mQp=mQp, mQs=mQs, mKp=mKp, mKs=mKs, mVp=mVp, mVs=mVs, mK=mK, mV=mV,
                            mMask=mMask, mSel=mSel, mO=mO, mLSE=mLSE, sl2=softmax_scale_log2,
                            copy_kv16=copy_kv16, copy_kp=copy_kp, copy_ks=copy_ks, copy_vp=copy_vp,
                            copy_vs=copy_vs, copy_rows16=copy_rows16, copy_dec16=copy_dec16, copy_vt16=copy_vt16,
                            mma_qk=mma_qk, mma_qk1=mma_qk1, mma_pvk=mma_pvk, mma_pvmn=mma_pvmn,
                            sQ_layout=sQ_layout, sK_layout=sK_layout, sVt_layout=sVt_layout, sV_layout=sV_layout,
                            base=base, mbar=mbar, meta=meta, b=b, hq=hq, hkv=hkv, Sq=Sq, Skv=Skv, nqb=nqb,
                            pair=pair)
        # each role gets its own copy of g: the tracer rebinds the Python-object attributes it threads through a
        # staged loop to the loop's results, which must not leak into the other branch
        if wg == 0:
            cute.arch.setmaxregister_decrease(self.regs_producer)
            self.producer(SimpleNamespace(**vars(g)), tidx)
        else:
            cute.arch.setmaxregister_increase(self.regs_consumer)
            self.consumer(SimpleNamespace(**vars(g)), wg - 1, tidx - WG * wg)

    # ---------------- tile lists ----------------
    @cute.jit
    def block_tiles(self, g, m_block: Int32) -> Int32:
        """visible_tiles of query block m_block, 0 for a block past the end (a CTA's last consumers when the
        number of query blocks is not a multiple of n)."""
        n_block_max = self.visible_tiles(m_block, g.Sq, g.Skv)
        return n_block_max if m_block < g.nqb else Int32(0)

    @cute.jit
    def next_union(self, rows: tuple, nbm: tuple, n: Int32, widx: Int32, w0: Uint32, w1: Uint32, w2: Uint32):
        """The largest key tile < n that some consumer c runs in phase 1 (visible to its block: < nbm[c], and not
        selected: its bit clear in its bitmask row rows[c]), -1 if none, as (tile, users, widx, w0, w1, w2): users
        bit c set iff consumer c runs it; the bitmask words w_c = rows[c][widx] are carried in registers (one load
        per 32 tiles, as ThriftPrefillKernel.next_unselected_cached; w2 unused with 2 consumers)."""
        m = n - 1
        users = Int32(0)
        searching = m >= 0
        while searching:
            wi = m // 32
            if wi != widx:
                w0 = Uint32(rows[0][wi])
                w1 = Uint32(rows[1][wi])
                if const_expr(self.nc == 3):
                    w2 = Uint32(rows[2][wi])
                widx = wi
            sh = Uint32(m % 32)
            users = Int32(0)
            if m < nbm[0]:
                if ((w0 >> sh) & Uint32(1)) == Uint32(0):
                    users = users | 1
            if m < nbm[1]:
                if ((w1 >> sh) & Uint32(1)) == Uint32(0):
                    users = users | 2
            if const_expr(self.nc == 3):
                if m < nbm[2]:
                    if ((w2 >> sh) & Uint32(1)) == Uint32(0):
                        users = users | 4
            if users != 0:
                searching = False
            else:
                m = m - 1
                searching = m >= 0
        return cutlass.max(m, -1), users, widx, w0, w1, w2

    # ---------------- producer warpgroup ----------------
    def producer_ctx(self, g, ptid):
        """Partitions of the producer's FP4 loads (for ThriftPrefillKernel.load_fp4_tile) and its smem views."""
        D, Tn, S, sm = self.D, self.Tn, self.S, self.smap
        st = sm.fp4_stage

        def pu8(off):
            return cute.recast_ptr(g.base + off, dtype=cutlass.Uint8)

        fb = sm.fp4_base
        fp4 = self._fp4_piece_offsets()
        sKp = cute.make_tensor(pu8(fb + fp4.kp), cute.make_layout((Tn, D // 2, S), stride=(D // 2, 1, st)))
        sKs = cute.make_tensor(pu8(fb + fp4.ks), cute.make_layout((Tn, D // 16, S), stride=(D // 16, 1, st)))
        sVp = cute.make_tensor(pu8(fb + fp4.vp), cute.make_layout((D, Tn // 2, S), stride=(Tn // 2, 1, st)))
        sVs = cute.make_tensor(pu8(fb + fp4.vs), cute.make_layout((D, Tn // 16, S), stride=(Tn // 16, 1, st)))
        sKp32 = cute.make_tensor(cute.recast_ptr(g.base + fb + fp4.kp, dtype=Uint32),
                                 cute.make_layout((Tn, D // 8, S), stride=(D // 8, 1, st // 4)))
        sVp32 = cute.make_tensor(cute.recast_ptr(g.base + fb + fp4.vp, dtype=Uint32),
                                 cute.make_layout((D, Tn // 8, S), stride=(Tn // 8, 1, st // 4)))
        p1 = self.p1_dtype
        kring = self._t16(g, sm.kring_off, g.sK_layout, p1)
        vring = self._t16(g, sm.vring_off, g.sVt_layout, p1)
        thr_kp, thr_ks = g.copy_kp.get_slice(ptid), g.copy_ks.get_slice(ptid)
        thr_vp, thr_vs = g.copy_vp.get_slice(ptid), g.copy_vs.get_slice(ptid)
        gKp = cute.local_tile(g.mKp[g.b, None, g.hkv, None], (Tn, D // 2), (None, 0))
        gKs = cute.local_tile(g.mKs[g.b, None, g.hkv, None], (Tn, D // 16), (None, 0))
        gVp = cute.local_tile(g.mVp[g.b, g.hkv, None, None], (D, Tn // 2), (0, None))
        gVs = cute.local_tile(g.mVs[g.b, g.hkv, None, None], (D, Tn // 16), (0, None))
        # phase 2: 16-bit K / V tiles (input dtype) straight into the ring stages (cp.async)
        thr_16 = g.copy_kv16.get_slice(ptid)
        kring16 = self._t16(g, sm.kring_off, g.sK_layout, self.dtype)   # (Tn, D, ring)
        vring16 = self._t16(g, sm.vring_off, g.sV_layout, self.dtype)   # (Tn, D, ring): V rows, not V^T
        gK16 = cute.local_tile(g.mK[g.b, None, g.hkv, None], (Tn, D), (None, 0))
        gV16 = cute.local_tile(g.mV[g.b, None, g.hkv, None], (Tn, D), (None, 0))
        parts = SimpleNamespace(
            tKp_g=thr_kp.partition_S(gKp), tKp_s=thr_kp.partition_D(sKp),
            tKp_c=thr_kp.partition_S(cute.make_identity_tensor((Tn, D // 2))),
            tKs_g=thr_ks.partition_S(gKs), tKs_s=thr_ks.partition_D(sKs),
            tVp_g=thr_vp.partition_S(gVp), tVp_s=thr_vp.partition_D(sVp),
            tVs_g=thr_vs.partition_S(gVs), tVs_s=thr_vs.partition_D(sVs),
            tK16_g=thr_16.partition_S(gK16), tK16_s=thr_16.partition_D(kring16),
            tV16_g=thr_16.partition_S(gV16), tV16_s=thr_16.partition_D(vring16),
            t16_c=thr_16.partition_S(cute.make_identity_tensor((Tn, D))))
        return SimpleNamespace(g=parts, tidx=ptid, Skv=g.Skv, copy_kp=g.copy_kp, copy_ks=g.copy_ks,
                               copy_vp=g.copy_vp, copy_vs=g.copy_vs, copy_kv16=g.copy_kv16, sKp32=sKp32, sKs=sKs,
                               sVp32=sVp32, sVs=sVs, kring=kring, vring=vring)

    def _fp4_piece_offsets(self):
        from layouts.prefill import PrefillSmemMap

        m = PrefillSmemMap(self.D, self.Tm, self.Tn, self.S, fp16_stages=1)
        return SimpleNamespace(kp=m.kp_off, ks=m.ks_off, vp=m.vp_off, vs=m.vs_off)

    def _t16(self, g, off, layout, ty):
        """A 16-bit wgmma-layout tensor at byte offset off (swizzle on the pointer, affine outer layout)."""
        return cute.make_tensor(cute.recast_ptr(g.base + off, layout.inner, dtype=ty), layout.outer)

    @cute.jit
    def producer(self, g, ptid: Int32):
        """Warpgroup 0. Phase 1: FP4 loads (cp.async ring of `stages`) and the one decode per key tile into the 16-bit
        ring. Phase 2: every consumer's selected 16-bit K (/ V) tiles cp.async'ed into the ring, round-robin over
        the consumers. Then the end-of-stream entry."""
        S, Tn, nc, ring = self.S, self.Tn, self.nc, self.ring
        ctx = self.producer_ctx(g, ptid)
        blocks = [nc * g.pair + c for c in range(nc)]
        nbm = tuple(self.block_tiles(g, mb) for mb in blocks)
        rows = tuple(g.mMask[g.b, g.hq, cutlass.min(mb, g.nqb - 1), None] for mb in blocks)
        # (taken before the staged loop below, which rebinds the attributes of g it uses)
        sel_rows = tuple(g.mSel[g.b, g.hq, cutlass.min(mb, g.nqb - 1), None] for mb in blocks)
        n_sel = cute.size(g.mSel.shape[3])
        mbar, meta, Skv = g.mbar, g.meta, g.Skv
        n_top = nbm[0]
        for c in cutlass.range_constexpr(1, nc):
            n_top = cutlass.max(n_top, nbm[c])
        # two cursors over the union list: n_cur (the tile decoded next) and n_iss (loads, S - 1 tiles ahead)
        z = Uint32(0)
        n_cur, u_cur, wc, c0, c1, c2 = self.next_union(rows, nbm, n_top, Int32(-1), z, z, z)
        n_iss, wi, i0, i1, i2 = n_cur, wc, c0, c1, c2
        for s in cutlass.range_constexpr(S - 1):
            if n_iss >= 0:
                self.load_fp4_tile(ctx, n_iss, s)
            cute.arch.cp_async_commit_group()
            n_iss, _u, wi, i0, i1, i2 = self.next_union(rows, nbm, n_iss, wi, i0, i1, i2)
        stage = Int32(0)
        r = Int32(0)
        empty_phase = Int32(1)  # a fresh mbarrier's preceding phase (parity 1) counts as complete
        while n_cur >= 0:
            cute.arch.cp_async_wait_group(S - 2)
            # every producer thread's copies of tile n_cur landed, and every thread finished decoding the tile
            # before it (whose FP4 stage the next load overwrites)
            cute.arch.barrier(barrier_id=BAR_PRODUCER, number_of_threads=WG)
            st_load = stage + (S - 1)
            if st_load >= S:
                st_load = st_load - S
            if n_iss >= 0:
                self.load_fp4_tile(ctx, n_iss, st_load)
            cute.arch.cp_async_commit_group()
            n_iss, _u, wi, i0, i1, i2 = self.next_union(rows, nbm, n_iss, wi, i0, i1, i2)
            cute.arch.mbarrier_wait(mbar + ring + r, empty_phase)  # every consumer is done with stage r
            # K rows past Skv are zero in the FP4 stage (load_fp4_tile), so no row checks: they decode to 0
            self.path.decode_rows(ctx.kring[None, None, r], g.copy_dec16, ptid, ctx.sKp32[None, None, stage],
                                  ctx.sKs[None, None, stage], g.Skv - n_cur * Tn, self.p1_bf16, self.bits, False)
            self.path.decode_rows(ctx.vring[None, None, r], g.copy_vt16, ptid, ctx.sVp32[None, None, stage],
                                  ctx.sVs[None, None, stage], self.D, self.p1_bf16, self.bits, False)
            cute.arch.fence_view_async_shared()  # the consumers' wgmmas read the decoded tiles (async proxy)
            self.publish(meta, mbar, ptid, r, n_cur, u_cur)
            cute.arch.mbarrier_arrive(mbar + r)
            r, empty_phase = self.advance(r, empty_phase)
            stage = stage + 1
            if stage == S:
                stage = Int32(0)
            n_cur, u_cur, wc, c0, c1, c2 = self.next_union(rows, nbm, n_cur, wc, c0, c1, c2)
        cute.arch.cp_async_wait_group(0)

        # ---- phase 2: the selected 16-bit tiles, no wait on their loads: each thread's cp.async arrive on full[r]
        # completes when its copies land (the ring's depth is the look-ahead) ----
        for i in range(n_sel):
            ns = [self.sel_at(sel_rows[c], i, nbm[c]) for c in range(nc)]  # the n loads in flight together
            for c in cutlass.range_constexpr(nc):
                n = ns[c]
                if n >= 0:
                    cute.arch.mbarrier_wait(mbar + ring + r, empty_phase)
                    self.load_rows16(ctx, ctx.g.tK16_g[None, None, None, n], ctx.g.tK16_s[None, None, None, r],
                                     n * Tn, Skv)
                    self.load_rows16(ctx, ctx.g.tV16_g[None, None, None, n], ctx.g.tV16_s[None, None, None, r],
                                     n * Tn, Skv)
                    cute.arch.cp_async_commit_group()
                    if (n + 1) * Tn > Skv:
                        # the last tile: its rows past Skv were zero-filled by plain stores, which the cp.async
                        # arrive does not order -- wait, fence into the async proxy, release-arrive instead
                        cute.arch.cp_async_wait_group(0)
                        cute.arch.fence_view_async_shared()
                        cute.arch.mbarrier_arrive(mbar + r)
                    else:
                        cute.arch.cp_async_mbarrier_arrive_noinc(mbar + r)
                    self.publish(meta, mbar, ptid, r, n, Int32((1 << c) | META_P2))
                    r, empty_phase = self.advance(r, empty_phase)
        cute.arch.cp_async_wait_group(0)
        cute.arch.mbarrier_wait(mbar + ring + r, empty_phase)
        self.publish(meta, mbar, ptid, r, Int32(-1), Int32(0))  # end of stream
        cute.arch.mbarrier_arrive(mbar + r)

    @cute.jit
    def publish(self, meta: cute.Tensor, mbar, ptid: Int32, r: Int32, n: Int32, users: Int32):
        """Thread 0 writes ring stage r's meta entry (tile, users | flags) and makes the full[r] arrival that
        releases it (full[r] counts the 128 producer threads' arrivals plus this one)."""
        if ptid == 0:
            meta[2 * r] = n
            meta[2 * r + 1] = users
            cute.arch.mbarrier_arrive(mbar + r)

    @cute.jit
    def advance(self, r: Int32, parity: Int32):
        """The next ring stage, and the parity to wait for on it (flips at the wrap)."""
        r = r + 1
        if r == self.ring:
            r = Int32(0)
            parity = parity ^ 1
        return r, parity

    # ---------------- consumer warpgroups ----------------
    @cute.jit
    def consumer(self, g, cidx: Int32, ctid: Int32):
        """Warpgroup 1 + cidx: query block n * pair + cidx through the ring (phase 1 tiles, then its phase 2 tiles)
        and the epilogue."""
        D, Tm, Tn, sm = self.D, self.Tm, self.Tn, self.smap
        dt, p1 = self.dtype, self.p1_dtype
        m_block = self.nc * g.pair + cidx

        sQ = self._t16(g, 0, g.sQ_layout, dt)[None, None, cidx]
        sQ1 = self._t16(g, 0, g.sQ_layout, p1)[None, None, cidx]
        kring1 = self._t16(g, sm.kring_off, g.sK_layout, p1)    # phase 1: decoded K (fp16)
        vring1 = self._t16(g, sm.vring_off, g.sVt_layout, p1)   # phase 1: decoded V^T (fp16)
        kring16 = self._t16(g, sm.kring_off, g.sK_layout, dt)   # phase 2: 16-bit K (input dtype)
        vring16 = self._t16(g, sm.vring_off, g.sV_layout, dt)   # phase 2: 16-bit V rows

        thr_s = g.mma_qk.get_slice(ctid)
        thr_s1 = g.mma_qk1.get_slice(ctid)
        thr_pvk = g.mma_pvk.get_slice(ctid)
        thr_pvmn = g.mma_pvmn.get_slice(ctid)
        acc_O = cute.make_rmem_tensor(thr_pvk.partition_shape_C((Tm, D)), Float32)
        acc_O.fill(0.0)
        # wgmma operands: every ring operand keeps the stage mode last (ring_stage() picks one)
        wg_q = thr_s.make_fragment_A(thr_s.partition_A(sQ))
        wg_q1 = thr_s1.make_fragment_A(thr_s1.partition_A(sQ1))
        wg_kring = thr_s1.make_fragment_B(thr_s1.partition_B(kring1))
        wg_vring = thr_pvk.make_fragment_B(thr_pvk.partition_B(vring1))
        wg_k16 = thr_s.make_fragment_B(thr_s.partition_B(kring16))
        wg_v16 = thr_pvmn.make_fragment_B(thr_pvmn.partition_B(cute.composition(  # V^T view: MN-major B
            vring16, cute.make_layout((D, Tn, self.ring), stride=(Tn, 1, Tn * D)))))

        n_rows = cute.size(self.mn_view(acc_O), mode=[0])
        row_max = cute.make_rmem_tensor((n_rows,), Float32)
        row_sum = cute.make_rmem_tensor((n_rows,), Float32)
        row_c = cute.make_rmem_tensor((n_rows,), Float32)
        row_max.fill(-Float32.inf)
        row_sum.fill(0.0)
        row_c.fill(1.0)

        thr_16 = g.copy_kv16.get_slice(ctid)
        gQ16 = cute.local_tile(g.mQ[g.b, None, g.hq, None], (Tm, D), (m_block, 0))
        mcS = cute.make_identity_tensor((g.Sq, g.Skv))
        parts = SimpleNamespace(tQ16_g=thr_16.partition_S(gQ16), tQ16_s=thr_16.partition_D(sQ),
                                t16_c=thr_16.partition_S(cute.make_identity_tensor((Tn, D))))
        def mkctx():  # one per use below: the tracer rebinds the attributes of a namespace a staged region uses
            return SimpleNamespace(
            g=parts, tidx=ctid, bar_id=BAR_CONSUMER0 + cidx, b=g.b, hq=g.hq, m_block=m_block, Sq=g.Sq,
            Skv=g.Skv, sl2=g.sl2, mcS=mcS, copy_kv16=g.copy_kv16, copy_rows16=g.copy_rows16,
            thr_mma_s=thr_s, tiled_mma_o=g.mma_pvk, mma_qk=g.mma_qk, mma_qk1=g.mma_qk1, mma_pvk=g.mma_pvk,
            mma_pvmn=g.mma_pvmn, wg_q=wg_q, wg_q1=wg_q1, wg_kdec=wg_kring, wg_vdec=wg_vring,
            wg_k16=wg_k16, wg_v16=wg_v16, acc_O=acc_O, row_max=row_max, row_sum=row_sum, row_c=row_c)

        ctx = mkctx()

        # decoded FP4 Q -> sQ[c] ("bits": dq(Q) * 2^(FP4_EXP - 14)); rows past Sq (or a missing block) -> 0
        gQp32 = cute.local_tile(cute.recast_tensor(g.mQp[g.b, None, g.hq, None], Uint32), (Tm, D // 8), (m_block, 0))
        gQs = cute.local_tile(g.mQs[g.b, None, g.hq, None], (Tm, D // 16), (m_block, 0))
        self.path.decode_rows(sQ1, g.copy_dec16, ctid, gQp32, gQs, g.Sq - m_block * Tm, self.p1_bf16, self.bits)
        self.to_async_proxy()
        self.sync(ctx)

        # ======================= the ring: phase 1 tiles, then this block's phase 2 tiles =======================
        r = Int32(0)
        full_phase = Int32(0)
        running = True
        in_p2 = Int32(0)
        ctx1, ctx_b, ctx2 = mkctx(), mkctx(), mkctx()
        while running:
            cute.arch.mbarrier_wait(g.mbar + r, full_phase)
            n = g.meta[2 * r]
            users = g.meta[2 * r + 1]
            if n < 0:
                running = False
            else:
                if ((users >> cidx) & 1) != 0:
                    need = self.tile_needs_mask(ctx1, n)
                    if (users & META_P2) == 0:
                        if need:
                            self.step(ctx1, n, r, 1, True)
                        if not need:
                            self.step(ctx1, n, r, 1, False)
                    else:
                        if in_p2 == 0:  # this block's first phase-2 tile: its phase 1 is over
                            self.begin_phase2(ctx_b, n_rows)
                            in_p2 = Int32(1)
                        # the cp.async data of the stage came through the mbarrier: into the async proxy (wgmma)
                        cute.arch.fence_view_async_shared()
                        if need:
                            self.step(ctx2, n, r, 2, True)
                        if not need:
                            self.step(ctx2, n, r, 2, False)
                cute.arch.mbarrier_arrive(g.mbar + self.ring + r)
                r = r + 1
                if r == self.ring:
                    r = Int32(0)
                    full_phase = full_phase ^ 1

        self.epilogue(mkctx(), g.mO, g.mLSE, sQ)

    @cute.jit
    def begin_phase2(self, ctx, n_rows: cutlass.Constexpr):
        """Between a consumer's last phase-1 tile and its first phase-2 tile: O from units of c (the last FP4 tile's
        s1) to true units (phase 2 keeps c = 1), and the real 16-bit Q over the decoded one in sQ[c]."""
        acc_mn = self.mn_view(ctx.acc_O)
        for rr in cutlass.range_constexpr(n_rows):
            acc_mn[rr, None] = acc_mn[rr, None].load() * ctx.row_c[rr]
            ctx.row_c[rr] = Float32(1.0)
        self.sync(ctx)  # every warp of this consumer is done with the decoded Q
        self.load_rows16(ctx, ctx.g.tQ16_g, ctx.g.tQ16_s, ctx.m_block * self.Tm, ctx.Sq)
        cute.arch.cp_async_commit_group()
        cute.arch.cp_async_wait_group(0)
        self.to_async_proxy()
        self.sync(ctx)
