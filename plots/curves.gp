# curves.gp -- curves of several runs overlaid (moelab plot loss / moelab plot maxvio)
#
# Called as:  gnuplot -e "<assignments>" plots/curves.gp
#   datafile, outfile, termspec, plottitle   as in every moelab plot script
#   ylabel_text  y axis label (e.g. "loss", "MaxVio")
#   has_val      1: column 3 holds a second series (validation loss) drawn as points in the
#                   colour of its run; NaN (or a missing column) where there is none
#                0: column 3 is ignored
#   logy         1: logarithmic y axis (values <= 0 are skipped), 0: linear
#   n, T[1..n]   number of runs (blocks) and their legends; default: count the blocks,
#                legends "run 1", ...
# Data: n blocks separated by TWO blank lines (run i = 'index i-1'), columns  step value [val]
# See plots/README.md.

if (!exists("datafile")) { exit error "curves.gp: datafile is not set" }
if (!exists("termspec"))  termspec  = "pngcairo size 1000,650 enhanced font 'DejaVu Sans,10'"
if (!exists("outfile"))   outfile   = "curves.png"
if (!exists("plottitle")) plottitle = ""
if (!exists("ylabel_text")) ylabel_text = ""
if (!exists("has_val"))   has_val   = 0
if (!exists("logy"))      logy      = 0

set terminal @termspec
set output outfile
set encoding utf8
set object 1 rectangle from screen 0,0 to screen 1,1 behind fillcolor rgb "white" fillstyle solid 1.0 noborder

# column(-2) is the block (index) number: its maximum + 1 counts the blocks, unlike
# STATS_blocks, which also counts the empty block after trailing blank lines
stats datafile using 1 nooutput
xlo = STATS_min; xhi = STATS_max
stats datafile using (column(-2)) nooutput
if (!exists("n")) { n = int(STATS_max) + 1 }
if (!exists("T")) { array T[n]; do for [i = 1:n] { T[i] = sprintf("run %d", i) } }

# NaN in a data column = no point there (lines are not broken by it)
set datafile missing NaN

# ---- look --------------------------------------------------------------------------------------
set title plottitle noenhanced
set xlabel "step" noenhanced
set ylabel ylabel_text noenhanced
set border 3 lw 0.8 lc rgb "#333333"
set tics out nomirror scale 0.6
set grid xtics ytics mytics back lt 1 lw 0.5 lc rgb "#e3e3e3", lt 1 lw 0.4 lc rgb "#f0f0f0"
set format x "%.0f"
if (xhi > xlo) { set xrange [xlo : xhi] } else { set xrange [xlo - 1 : xhi + 1] }
set autoscale y
if (logy) {
    # a log axis autoscaled to whole decades wastes most of the height: fit the data instead
    set logscale y
    set autoscale yfix
    set offsets 0, 0, graph 0.04, graph 0.04
    set format y "%g"
    set mytics 10
    # less than 3 decades of data: label 1-2-5 steps (under one decade 1-1.5-2-3-4-5-6-8),
    # not just the decades
    stats datafile using (column(2) > 0 ? column(2) : NaN) nooutput
    lylo = log10(STATS_min); lyhi = log10(STATS_max)
    if (lyhi - lylo < 3) {
        if (lyhi - lylo < 1) { array M = [1, 1.5, 2, 3, 4, 5, 6, 8] } else { array M = [1, 2, 5] }
        tl = ""
        do for [k = floor(lylo) : ceil(lyhi)] {
            do for [j = 1:|M|] {
                if (M[j] > 0) {
                    tl = tl . sprintf("%s\"%g\" %.12g", (strlen(tl) ? ", " : ""), M[j] * 10.0**k, M[j] * 10.0**k)
                }
            }
        }
        eval "set ytics (" . tl . ")"
        set grid noytics
        set grid ytics
        unset mytics
    }
} else {
    unset logscale y
    set mytics 2
}
set key noenhanced opaque box lc rgb "#bbbbbb" lw 0.5 samplen 2.5 spacing 1.1 width 1 Left reverse
if (n > 6) { set key outside right top vertical } else { set key inside right top vertical }

# categorical colours (Tableau 10)
array C = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", \
           "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
col(i) = C[(i - 1) % |C| + 1]

# The plot command is assembled as a string so that a run without any validation point gets
# no val series (gnuplot would warn "Skipping data file with no valid points").  Titles are
# referenced as T[i] inside the command, so any characters in them are safe.
cmd = "plot"
do for [i = 1:n] {
    cmd = cmd . sprintf("%s datafile index %d using 1:2 with lines lw 1.5 lc rgb col(%d) title T[%d]", \
                        (i > 1 ? "," : ""), i - 1, i, i)
}
nvalruns = 0
if (has_val) {
    do for [i = 1:n] {
        # count the valid (non-NaN, present) values of column 3 in block i
        nv = 0
        stats datafile index (i - 1) using (nv = nv + (valid(3) ? 1 : 0), $1) nooutput
        if (nv > 0) {
            nvalruns = nvalruns + 1
            # few runs: one legend entry per run; many: one generic entry (below)
            cmd = cmd . sprintf(", datafile index %d using 1:3 with points pt 7 ps 0.6 lc rgb col(%d) %s", \
                                i - 1, i, (n <= 4 ? sprintf("title T[%d] . \" (val)\"", i) : "notitle"))
        }
    }
    if (nvalruns > 0 && n > 4) {
        cmd = cmd . ", keyentry with points pt 7 ps 0.6 lc rgb '#333333' title 'points: validation'"
    }
}
eval cmd

unset output
