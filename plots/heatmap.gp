# heatmap.gp -- expert-load heatmap (moelab plot heatmap)
#
# Called as:  gnuplot -e "<assignments>" plots/heatmap.gp
#   datafile     data file: 3 columns  x y z  in gnuplot grid order
#                (one block per x value, blocks separated by ONE blank line)
#   outfile      image to write
#   termspec     terminal spec, e.g. "pngcairo size 1000,650 enhanced font 'DejaVu Sans,10'"
#   plottitle    figure title (printed noenhanced: underscores stay underscores)
#   mode         'steps'  : x = training step, y = expert index
#                'layers' : x = expert index,  y = layer index
#   logscale     0: z = load / uniform share, cbrange [0:cbmax], white at z = 1
#                1: z = log2(load / uniform share), cbrange [-cbmax:cbmax], white at 0
#   cbmax        top of the colour range (linear: a multiple of the uniform share, > 1;
#                log: in log2 units); values outside are clipped to the end colours
#   xlabel_text, ylabel_text   axis labels (defaults follow mode)
# z = NaN marks a cell without data (drawn grey-hatched, not white).
# See plots/README.md.

if (!exists("datafile")) { exit error "heatmap.gp: datafile is not set" }
if (!exists("termspec"))  termspec  = "pngcairo size 1000,650 enhanced font 'DejaVu Sans,10'"
if (!exists("outfile"))   outfile   = "heatmap.png"
if (!exists("plottitle")) plottitle = ""
if (!exists("mode"))      mode      = "steps"
if (!exists("logscale"))  logscale  = 0
if (!exists("cbmax"))     cbmax     = (logscale ? 3 : 4)
if (!exists("xlabel_text")) xlabel_text = (mode eq "layers" ? "expert" : "step")
if (!exists("ylabel_text")) ylabel_text = (mode eq "layers" ? "layer" : "expert")

cbmax = real(cbmax)
cbmax = (logscale ? (cbmax > 0 ? cbmax : 3) : (cbmax > 1 ? cbmax : 2))

set terminal @termspec
set output outfile
set encoding utf8
# opaque white page (svg and pdf are transparent by default)
set object 1 rectangle from screen 0,0 to screen 1,1 behind fillcolor rgb "white" fillstyle solid 1.0 noborder
# cells without data (z = NaN, e.g. a dense layer that routes nothing) show this grey hatching
set object 2 rectangle from graph 0,0 to graph 1,1 behind fillcolor rgb "#9a9a9a" fillstyle pattern 4 noborder

# ---- data extent (also catches a degenerate 1-row / 1-column grid) --------------------
stats datafile using 1 nooutput
xlo = STATS_min; xhi = STATS_max
npts = STATS_records
stats datafile using 2 nooutput
ylo = STATS_min; yhi = STATS_max

# ---- look -------------------------------------------------------------------------------
set title plottitle noenhanced
set xlabel xlabel_text noenhanced
set ylabel ylabel_text noenhanced
set border lw 0.8 lc rgb "#333333"
set tics out nomirror scale 0.6
set mxtics default
unset grid
unset key
set colorbox vertical default front
set cbtics out scale 0.6 nomirror

# integer axes (experts, layers): integer tic labels, a sane tic count
set format x "%.0f"
set format y "%.0f"
# tic step 1, 2, 5, 10, 20, 50, ... giving at most ~ntic tics over [lo:hi]
nicestep(lo, hi, ntic) = (hi - lo) <= ntic ? 1 : \
    (s0 = 10**floor(log10((hi - lo) / ntic)), \
     r = (hi - lo) / ntic / s0, \
     r <= 1 ? s0 : r <= 2 ? 2*s0 : r <= 5 ? 5*s0 : 10*s0)
if (mode eq "layers") {
    set xtics nicestep(xlo, xhi, 16)
    set ytics nicestep(ylo, yhi, 14)
} else {
    set ytics nicestep(ylo, yhi, 12)
}

# ---- colour scale -------------------------------------------------------------------------
# ColorBrewer RdBu (7 classes).  'set palette defined' rescales its positions to [0:1] over
# [first:last]; with cbrange equal to [first:last] every position below is exactly a cb value,
# so the white stop sits exactly at z = 1 (linear) or z = 0 (log).
if (logscale) {
    c = cbmax
    set palette defined (-c "#2166ac", -2*c/3 "#67a9cf", -c/3 "#d1e5f0", 0 "#f7f7f7", \
                          c/3 "#fddbc7", 2*c/3 "#ef8a62", c "#b2182b")
    set cbrange [-c:c]
    # tics at whole powers of two, labelled as multiples: 1/4, 1/2, 1, 2, 4, ...
    kmax = floor(c + 1e-9)
    kstep = (kmax <= 4 ? 1 : kmax <= 8 ? 2 : kmax <= 16 ? 4 : 8)
    kmax = kmax - (kmax % kstep)
    lab(k) = (k == 0 ? "1" : k > 0 ? sprintf("%.0f", 2**k) : sprintf("1/%.0f", 2**(-k)))
    tl = ""
    do for [k = -kmax : kmax : kstep] {
        tl = tl . (strlen(tl) ? ", " : "") . sprintf("\"%s\" %d", lab(k), k)
    }
    if (kmax < 1) { tl = "\"1\" 0" }
    eval "set cbtics (" . tl . ")"
    set cblabel "load / uniform share (log scale)" noenhanced
} else {
    c = cbmax
    # blue side linear on [0:1]; red side at geometric positions on [1:cbmax] so that a
    # 2x overload is visibly red even when cbmax is large
    set palette defined (0 "#2166ac", 1.0/3 "#67a9cf", 2.0/3 "#d1e5f0", 1 "#f7f7f7", \
                          c**(1.0/3) "#fddbc7", c**(2.0/3) "#ef8a62", c "#b2182b")
    set cbrange [0:c]
    set cbtics autofreq
    set cbtics add ("1" 1)
    set cblabel "load / uniform share" noenhanced
}
set palette maxcolors 0
set palette model RGB

# ---- ranges: tight (the image's outer pixel edges) ---------------------------------------
set autoscale xfix
set autoscale yfix
set offsets 0, 0, 0, 0

if (xhi > xlo && yhi > ylo) {
    # regular grid: a bitmap, one pixel per (x, y) cell
    plot datafile using 1:2:3 with image notitle
} else {
    # degenerate grid (1 layer, 1 step or 1 expert): 'with image' needs >= 2 x 2, draw cells
    dx = (xhi > xlo ? (xhi - xlo) / (npts - 1 > 0 ? npts - 1 : 1) : 1)
    dy = (yhi > ylo ? (yhi - ylo) / (npts - 1 > 0 ? npts - 1 : 1) : 1)
    set xrange [xlo - dx/2.0 : xhi + dx/2.0]
    set yrange [ylo - dy/2.0 : yhi + dy/2.0]
    plot datafile using 1:2:(dx/2.0):(dy/2.0):3 with boxxyerror \
         fillstyle solid 1.0 noborder lc palette notitle
}

unset output
