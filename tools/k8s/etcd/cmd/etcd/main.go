// Command etcd is upstream etcd v3.7.3: go.etcd.io/etcd/server/v3 holds the server
// but no main package, so this wrapper calls its entry point, as etcd's own main.go does.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
