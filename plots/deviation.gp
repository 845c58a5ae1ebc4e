# deviation.gp -- relative deviation of the min- and max-loaded experts from the uniform load
# (moelab plot deviation; cf. Sigma-MoE-Tiny, arXiv 2512.16248, Fig. 2a)
#
# Called as:  gnuplot -e "<assignments>" plots/deviation.gp
#   datafile, outfile, termspec, plottitle   as in every moelab plot script
#   mode  'layers'   : one row per layer, columns  layer min_dev max_dev [maxvio]
#                      (maxvio is accepted and ignored: it equals max_dev)
#         'training' : n blocks separated by TWO blank lines (block i = 'index i-1'),
#                      columns  step min_dev max_dev ; T[i] is block i's legend
#   n, T[1..n]       (training mode) number of blocks and their legends; default: count the
#                    blocks in the file, legends "block 1", ...
# Deviation = (load - mean load) / mean load: -1 is an expert that gets no tokens, 0 is uniform.
# See plots/README.md.

if (!exists("datafile")) { exit error "deviation.gp: datafile is not set" }
if (!exists("termspec"))  termspec  = "pngcairo size 1000,650 enhanced font 'DejaVu Sans,10'"
if (!exists("outfile"))   outfile   = "deviation.png"
if (!exists("plottitle")) plottitle = ""
if (!exists("mode"))      mode      = "layers"

set terminal @termspec
set output outfile
set encoding utf8
set object 1 rectangle from screen 0,0 to screen 1,1 behind fillcolor rgb "white" fillstyle solid 1.0 noborder

# ---- data extent -------------------------------------------------------------------------
# column(-2) is the block (index) number: its maximum + 1 counts the blocks, unlike
# STATS_blocks, which also counts the empty block after trailing blank lines
stats datafile using 1 nooutput
xlo = STATS_min; xhi = STATS_max
stats datafile using (column(-2)) nooutput
nblocks = int(STATS_max) + 1
stats datafile using 2 nooutput
dlo = STATS_min; dhi = STATS_max
stats datafile using 3 nooutput
dlo = (STATS_min < dlo ? STATS_min : dlo)
dhi = (STATS_max > dhi ? STATS_max : dhi)
# y range always holds -1 (an idle expert) and 0 (uniform), plus 6% headroom
ylo = (dlo < -1 ? dlo : -1)
yhi = (dhi > 0 ? dhi : 0)
ypad = 0.06 * (yhi - ylo)
set yrange [ylo - ypad : yhi + ypad]

# ---- look ----------------------------------------------------------------------------------
set title plottitle noenhanced
set ylabel "relative deviation from uniform ((load - mean) / mean)" noenhanced
set border 3 lw 0.8 lc rgb "#333333"
set tics out nomirror scale 0.6
set grid xtics ytics back lt 1 lw 0.5 lc rgb "#e3e3e3"
set key noenhanced opaque box lc rgb "#bbbbbb" lw 0.5 samplen 2.5 spacing 1.1 width 1
set style line 1 lc rgb "#b2182b" lw 1.6 pt 7 ps 0.55     # max-loaded: red
set style line 2 lc rgb "#2166ac" lw 1.6 pt 5 ps 0.50     # min-loaded: blue
set style line 9 lc rgb "#555555" lw 1.0 dt 2             # uniform (0)
set style line 8 lc rgb "#999999" lw 0.8 dt 3             # idle expert (-1)
set arrow 8 from graph 0, first -1 to graph 1, first -1 nohead back ls 8
set label 8 "no tokens" at graph 0.995, first -1 right offset 0, character -0.75 \
    textcolor rgb "#888888" front noenhanced

# categorical colours for the training curves (Tableau 10)
array C = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", \
           "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
col(i) = C[(i - 1) % |C| + 1]

if (mode eq "training") {
    if (!exists("n")) { n = nblocks }
    if (!exists("T")) { array T[n]; do for [i = 1:n] { T[i] = sprintf("block %d", i) } }
    set xlabel "step" noenhanced
    set xrange [xlo : xhi]
    set format x "%.0f"
    if (n > 4) { set key outside right top vertical Left reverse } \
    else       { set key inside right top vertical Left reverse }
    plot for [i = 1:n] datafile index (i - 1) using 1:3 with lines lw 1.6 lc rgb col(i) \
             title T[i], \
         for [i = 1:n] datafile index (i - 1) using 1:2 with lines lw 1.6 dt 2 lc rgb col(i) \
             notitle, \
         0 with lines ls 9 title "uniform", \
         keyentry with lines lw 1.6 lc rgb "#333333" title "max-loaded expert (solid)", \
         keyentry with lines lw 1.6 dt 2 lc rgb "#333333" title "min-loaded expert (dashed)"
} else {
    set xlabel "layer" noenhanced
    set xrange [xlo - 0.5 : xhi + 0.5]
    # integer tics: 1, 2, 5, 10, ... so that there are at most ~20
    span = xhi - xlo
    xstep = (span <= 20 ? 1 : span <= 40 ? 2 : span <= 100 ? 5 : span <= 200 ? 10 : 20)
    set xtics xstep
    if (xstep > 1) { set mxtics xstep } else { unset mxtics }
    set format x "%.0f"
    # legend in one row between the title and the plot
    set tmargin 4.6
    set title offset 0, 1.5
    set key at graph 0.5, graph 1.015 center bottom horizontal noopaque nobox samplen 3 width 2
    # few layers: draw bars (impulses) so single points read clearly; many layers: linespoints
    if (span < 8) {
        set style line 1 lw 6 pt 7 ps 0.9
        set style line 2 lw 6 pt 5 ps 0.8
        plot datafile using ($1 + 0.08):3 with impulses ls 1 title "max-loaded expert", \
             datafile using ($1 + 0.08):3 with points ls 1 notitle, \
             datafile using ($1 - 0.08):2 with impulses ls 2 title "min-loaded expert", \
             datafile using ($1 - 0.08):2 with points ls 2 notitle, \
             0 with lines ls 9 title "uniform"
    } else {
        plot datafile using 1:3 with linespoints ls 1 title "max-loaded expert", \
             datafile using 1:2 with linespoints ls 2 title "min-loaded expert", \
             0 with lines ls 9 title "uniform"
    }
}

unset output
