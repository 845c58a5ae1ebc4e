/* cli.h: the subcommands of the one moelab binary. Each takes the arguments after its name and returns
 * the process exit code: 0 ok, 1 run failed, 2 bad usage or input. */
#ifndef MOELAB_CLI_H
#define MOELAB_CLI_H

int cli_train(int argc, char **argv);
int cli_data(int argc, char **argv);
int cli_bench(int argc, char **argv);
int cli_plan(int argc, char **argv);

#endif
