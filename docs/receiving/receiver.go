// A Hookline receiver in Go: verifies each request with the Standard Webhooks library
// (go get github.com/standard-webhooks/standard-webhooks/libraries/go), skips ids it has
// already handled, answers 204.
// Run: WEBHOOK_SECRET=whsec_... PORT=8000 go run receiver.go
package main

import (
	"fmt"
	"io"
	"log"
	"net/http"
	"os"
	"sync"

	standardwebhooks "github.com/standard-webhooks/standard-webhooks/libraries/go"
)

func main() {
	wh, err := standardwebhooks.NewWebhook(os.Getenv("WEBHOOK_SECRET")) // whsec_...
	if err != nil {
		log.Fatal(err)
	}
	var mu sync.Mutex
	seen := map[string]bool{} // webhook-id values already handled; keep these in your database

	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		if err != nil {
			w.WriteHeader(http.StatusBadRequest)
			return
		}
		// Checks the signature over the exact body and the timestamp (5 minutes).
		if err := wh.Verify(body, r.Header); err != nil {
			fmt.Printf("{\"rejected\": %q}\n", err.Error())
			w.WriteHeader(http.StatusBadRequest)
			return
		}
		id := r.Header.Get("webhook-id")
		mu.Lock()
		isNew := !seen[id]
		seen[id] = true
		mu.Unlock()
		if isNew { // a retry of a handled message: answer 2xx, do nothing
			fmt.Printf("{\"verified\": %q, \"type\": %q}\n", id, r.Header.Get("webhook-event-type"))
		}
		w.WriteHeader(http.StatusNoContent)
	})
	log.Fatal(http.ListenAndServe("127.0.0.1:"+envOr("PORT", "8000"), nil))
}

func envOr(name, fallback string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return fallback
}
