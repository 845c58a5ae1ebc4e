# fp.gp -- per-expert token fraction f and mean gate probability p, each sorted descending,
# against the uniform share 1/E; one panel per layer (moelab plot fp;
# cf. Sigma-MoE-Tiny, arXiv 2512.16248, Fig. 2b/2c)
#
# Called as:  gnuplot -e "<assignments>" plots/fp.gp
#   datafile, outfile, termspec, plottitle   as in every moelab plot script
#   uniform    the uniform share 1/E (drawn as a dashed horizontal line)
#   n, T[1..n] number of panels and their titles (e.g. "layer 0"); default: count the blocks,
#              titles "block 1", ...
# Data: n blocks separated by TWO blank lines (panel i = 'index i-1'), columns  rank f p
#       (f and p each sorted descending; rank is the x value, 0- or 1-based).
# All panels share one y range so that they compare at a glance.
# See plots/README.md.

if (!exists("datafile")) { exit error "fp.gp: datafile is not set" }
if (!exists("termspec"))  termspec  = "pngcairo size 1000,650 enhanced font 'DejaVu Sans,10'"
if (!exists("outfile"))   outfile   = "fp.png"
if (!exists("plottitle")) plottitle = ""

set terminal @termspec
set output outfile
set encoding utf8

# ---- data extent ---------------------------------------------------------------------------
# column(-2) is the block (index) number: its maximum + 1 counts the blocks, unlike
# STATS_blocks, which also counts the empty block after trailing blank lines
stats datafile using 1 nooutput
xlo = STATS_min; xhi = STATS_max
stats datafile using (column(-2)) nooutput
nblocks = int(STATS_max) + 1
stats datafile using 2 nooutput
yhi = STATS_max
stats datafile using 3 nooutput
yhi = (STATS_max > yhi ? STATS_max : yhi)
if (!exists("uniform")) { uniform = 1.0 / (xhi - xlo + 1) }
yhi = (uniform > yhi ? uniform : yhi)
if (!exists("n")) { n = nblocks }
if (!exists("T")) { array T[n]; do for [i = 1:n] { T[i] = sprintf("block %d", i) } }

# ---- look ------------------------------------------------------------------------------------
set border 3 lw 0.8 lc rgb "#333333"
set tics out nomirror scale 0.6
set grid xtics ytics back lt 1 lw 0.5 lc rgb "#e3e3e3"
set xlabel "experts (sorted)" noenhanced
set xrange [xlo - 0.5 : xhi + 0.5]
set yrange [0 : 1.06 * yhi]
set format x "%.0f"
set format y "%g"
span = xhi - xlo
# x tic step 1, 2, 5, 10, 20, 50, ... giving about ntic intervals; fewer in narrow panels
nicestep(w, ntic) = w <= ntic ? 1 : \
    (s0 = 10**floor(log10(w / ntic)), r = w / ntic / s0, \
     r <= 1 ? s0 : r <= 2 ? 2*s0 : r <= 5 ? 5*s0 : 10*s0)
set xtics nicestep(span, (n >= 5 ? 2 : n >= 3 ? 5 : 10))
set ytics autofreq
unset key
# show about 16 markers per curve, whatever the number of experts
pint = (span > 24 ? int(ceil((span + 1) / 16.0)) : 1)
set style line 1 lc rgb "#1f77b4" lw 1.6 pt 7 ps 0.55 pi pint    # f: token fraction
set style line 2 lc rgb "#ff7f0e" lw 1.6 pt 5 ps 0.50 pi pint    # p: gate probability
set style line 9 lc rgb "#555555" lw 1.0 dt 2                    # uniform 1/E

# One legend for all panels: a row along the bottom of the page, under the x labels, left-aligned
# with the first panel (the bottom margin of the layout reserves the room).  gnuplot's key
# cannot be wider than one panel, so it is drawn as arrows and labels in character coordinates.
array LT = ["token fraction f", "mean gate probability p", "uniform 1/E"]
legend_x0 = 10
legend_y  = 1.1

# the figure title is a screen label on the first panel (a multiplot title would be painted
# over by the white page below)
set multiplot layout 1, n margins char 10, char 2, char 5.8, char (strlen(plottitle) ? 5.5 : 3.5) \
    spacing char 7, char 0
do for [i = 1:n] {
    if (i == 1) {
        # opaque white page behind the first panel only (svg and pdf are transparent otherwise)
        set object 1 rectangle from screen 0,0 to screen 1,1 behind \
            fillcolor rgb "white" fillstyle solid 1.0 noborder
        set ylabel "fraction" noenhanced
        set label 1 plottitle at screen 0.5, screen 1 center offset 0, character -1.2 noenhanced front
        lx = legend_x0
        do for [k = 1:3] {
            sty = (k == 3 ? 9 : k)
            eval sprintf("set arrow %d from character %g, character %g to character %g, character %g nohead ls %d front", \
                         10 + k, lx, legend_y, lx + 3, legend_y, sty)
            if (k < 3) {
                eval sprintf("set label %d '' at character %g, character %g point ls %d front", \
                             20 + k, lx + 1.5, legend_y, sty)
            }
            eval sprintf("set label %d LT[%d] at character %g, character %g left noenhanced front", \
                         10 + k, k, lx + 3.8, legend_y)
            lx = lx + 3.8 + strlen(LT[k]) + 3
        }
    } else {
        unset object 1
        unset label 1
        unset arrow
        unset label
        unset ylabel
        unset key
    }
    set title T[i] noenhanced
    plot datafile index (i - 1) using 1:2 with linespoints ls 1 title "token fraction f", \
         datafile index (i - 1) using 1:3 with linespoints ls 2 title "mean gate probability p", \
         uniform with lines ls 9 title "uniform 1/E"
}
unset multiplot
unset output
